"""Synthetic chest-CT cohort: real DICOM series with COVID-19-like lesions and masks.

    python -m data_tools.phantom --out DIR --patients N --seed S [--size 512] [--mix default]

Each patient is a DICOM CT series (CT Image Storage, int16 with rescale slope/intercept,
pixel spacing, slice geometry, study/series/SOP UIDs and a fake name and ID) of 20-40
axial slices over 300 mm of chest, a lesion label volume ``lesions.nii.gz`` (0
background, 1 ground-glass opacity, 2 consolidation, 3 fibrosis) aligned to the series by
its affine, and a row of ``manifest.csv`` (patient ID, diagnosis, severity).

The anatomy (`anatomy`): a body outline that varies by patient, subcutaneous fat and
chest-wall muscle, ribs cut obliquely with costal cartilage, sternum, scapulae, a
vertebra with its arch and processes, the mediastinum with the heart in its epicardial
fat, aorta, pulmonary trunk and arteries, superior vena cava and arch vessels,
oesophagus, trachea and main bronchi, the diaphragm's domes with liver and spleen, and
lungs that fill the chest around them, denser towards the back as in a supine patient.
Pulmonary arteries, veins and bronchi are 3-D trees that branch and taper from the hila
(`trees`); a slice shows the parts inside its thickness, as bright as they fill it.
Lung texture, CT noise with a grain of its own, and partial volume at every edge (each
structure is drawn anti-aliased) complete the image.

Lesions by diagnosis (`lesions`, which cites the patterns): COVID-19 bilateral
subpleural ground glass, crazy paving, consolidation and, when severe, fibrotic zones
with subpleural bands; bacterial lobar consolidation with air bronchograms; viral
airway-centred disease with tree-in-bud. Only COVID-19 lesions are labelled.

Everything is deterministic for a seed. Synthetic data: research and testing only.
"""

from data_tools.phantom.cohort import (
    COHORT_MIXES,
    COHORT_PATTERN,
    PNEUMONIA_PATTERN,
    cohort_plan,
    main,
    make_cohort,
    phantom_patient_id,
)
from data_tools.phantom.dicom import write_patient
from data_tools.phantom.lesions import LABELS
from data_tools.phantom.render import (
    AIR,
    FOV_MM,
    MIN_SLICES,
    SLICE_RANGE,
    PhantomPatient,
    check_slice_range,
    make_patient,
)

__all__ = [
    "AIR",
    "COHORT_MIXES",
    "COHORT_PATTERN",
    "FOV_MM",
    "LABELS",
    "MIN_SLICES",
    "PNEUMONIA_PATTERN",
    "SLICE_RANGE",
    "PhantomPatient",
    "check_slice_range",
    "cohort_plan",
    "main",
    "make_cohort",
    "make_patient",
    "phantom_patient_id",
    "write_patient",
]
