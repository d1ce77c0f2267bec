"""`predict`'s files on the input's grid: NIfTI label and probability volumes and the
DICOM SEG object (highdicom), with the source's or pseudonymised patient module."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_tools.masks import RAS_FROM_LPS
from tfcovseg import __version__
from tfcovseg.inference.studies import Volume

# Segmented property codes of the DICOM SEG segments (DICOM CID 7150 / 6104, SNOMED CT).
_SEG_CODES = {
    "ggo": ("112120", "DCM", "Ground glass opacity"),
    "consolidation": ("95436008", "SCT", "Lung consolidation"),
    "fibrosis": ("112674009", "SCT", "Fibrosis"),
}
_LESION_CODE = ("52988006", "SCT", "Lesion")
_CATEGORY_CODE = ("49755003", "SCT", "Morphologically Abnormal Structure")


def nifti_image(volume: Volume, data: np.ndarray):
    """A NIfTI image of [K, H, W] data on the input's grid and affine."""
    import nibabel as nib

    if volume.kind == "dicom":
        # voxel (row, column, slice) -> LPS by the series geometry, then to RAS.
        affine = RAS_FROM_LPS @ volume.series_obj.affine_lps()
        array = np.moveaxis(data, 0, 2)
    else:
        # Inverse of read_nifti_volume's display transform, on the canonical affine.
        affine = volume.affine
        array = np.ascontiguousarray(data.transpose(2, 1, 0)[::-1, ::-1])
    image = nib.Nifti1Image(np.ascontiguousarray(array), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return image


def write_seg(
    volume: Volume, labels: np.ndarray, classes, path: Path, version, research=False
) -> bool:
    """A DICOM SEG of the label volume referencing the source slices; False if empty.

    As DICOM requires, the SEG carries the source study's patient and study modules (so a
    PACS files it with the study). With `research`, the patient module holds the
    pseudonyms instead (PatientName and PatientID the patient's pseudonym, no birth date,
    accession number, study ID or referring physician); the UIDs still reference the
    source images, which the segmentation's frames are aligned to, and the study date,
    time and the patient's sex stay.
    """
    import highdicom as hd
    from pydicom.sr.coding import Code
    from pydicom.uid import generate_uid

    present = sorted(int(v) for v in np.unique(labels) if v > 0)
    if not present:
        return False
    descriptions = []
    for number in present:
        name = classes[number - 1]
        value, scheme, meaning = _SEG_CODES.get(name, _LESION_CODE)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=len(descriptions) + 1,
                segment_label=name,
                segmented_property_category=Code(*_CATEGORY_CODE),
                segmented_property_type=Code(value, scheme, meaning),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=hd.AlgorithmIdentificationSequence(
                    name="tfcovseg coarse-refine",
                    version=str(version),
                    family=Code("113257", "DCM", "Artificial Intelligence"),
                ),
            )
        )
    renumbered = np.zeros((*labels.shape, len(present)), bool)
    for s, number in enumerate(present):
        renumbered[..., s] = labels == number
    seg = hd.seg.Segmentation(
        source_images=volume.datasets,
        pixel_array=renumbered,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=9901,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="tfcovseg",
        manufacturer_model_name="coarse-refine (research use, not a medical device)",
        software_versions=__version__,
        device_serial_number="0",
        series_description="tfcovseg lesions (research use)",
    )
    if research:
        _pseudonymise_patient(seg, volume.patient)
    seg.save_as(path)
    return True


# Free text and names that may identify the patient or the hospital, which highdicom
# copies from the source (the study module; InstitutionName also into the contributing
# equipment): optional in a SEG, so the research SEG leaves them out, at any depth.
_IDENTIFYING_TEXT = (
    "StudyDescription", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "StationName", "OperatorsName",
    "PerformingPhysicianName", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy",
    "RequestingPhysician", "AdmittingDiagnosesDescription", "PatientComments",
    "AdditionalPatientHistory", "PatientAddress", "PatientTelephoneNumbers",
    "PatientMotherBirthName", "Occupation", "OtherPatientIDsSequence", "OtherPatientIDs",
    "OtherPatientNames",
)  # fmt: skip


def _remove_everywhere(ds, keywords) -> None:
    for keyword in keywords:
        if keyword in ds:
            delattr(ds, keyword)
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                _remove_everywhere(item, keywords)


def _pseudonymise_patient(ds, patient: str) -> None:
    """Replaces a dataset's patient identity (and the study's identifying attributes) with
    a pseudonym, as the research SEG carries it."""
    ds.PatientName = ds.PatientID = patient
    for keyword in ("PatientBirthDate", "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        if keyword in ds:
            setattr(ds, keyword, "")
    _remove_everywhere(ds, _IDENTIFYING_TEXT)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "tfcovseg research SEG: patient pseudonymised, UIDs retained"
