"""A phantom patient written as a DICOM CT series and a NIfTI label volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_tools.phantom.render import PhantomPatient


def _uid(*parts) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _decimal(*values):
    """Decimal Strings (DS) of at most 16 characters, as the VR says."""
    from pydicom.valuerep import DS

    return [DS(v, auto_format=True) for v in values]


def _series_dataset(patient_id, patient_name, birth_date, uids):
    """The attributes every slice of the phantom series shares (patient, study, series,
    equipment)."""
    from pydicom.dataset import Dataset
    from pydicom.uid import CTImageStorage

    ds = Dataset()
    ds.SOPClassUID, ds.Modality = CTImageStorage, "CT"
    ds.PatientName, ds.PatientID = patient_name, patient_id
    ds.PatientBirthDate, ds.PatientSex = birth_date, "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids
    ds.StudyDate = ds.SeriesDate = "20200401"
    ds.StudyTime = ds.SeriesTime = "120000"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.Manufacturer = "tfcovseg synthetic phantom"
    ds.PositionReferenceIndicator = ""
    ds.StudyDescription = "Synthetic chest CT phantom (tfcovseg)"
    ds.SeriesNumber = 1
    # Supine (anterior at the top of the image), head first into the gantry.
    ds.PatientPosition, ds.BodyPartExamined = "HFS", "CHEST"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.KVP, ds.AcquisitionNumber = "120", 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = -500, 1500
    return ds


def _set_pixels(ds, hu: np.ndarray, outside: np.ndarray, signed: bool) -> None:
    """A slice's HU as stored pixels: signed with padding outside the field of view, or
    unsigned 12-bit with intercept -1024."""
    hu = np.rint(hu).astype(np.int16)
    ds.Rows, ds.Columns = hu.shape
    if signed:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        stored = hu.copy()
        stored[outside] = -2000
        ds.PixelPaddingValue = -2000
        pixels = stored.astype("<i2")
    else:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        pixels = (hu.astype(np.int32) + 1024).clip(0, 4095).astype("<u2")
    ds.PixelData = pixels.tobytes()


def write_patient(
    patient: PhantomPatient,
    folder: Path,
    *,
    patient_id: str,
    patient_name: str,
    birth_date: str = "19600101",
    seed: int = 0,
    signed: bool = True,
) -> None:
    """Writes a patient as a DICOM series in ``folder/ct`` and ``folder/lesions.nii.gz``.

    Args:
        patient: From `make_patient`.
        folder: Destination (created).
        patient_id, patient_name, birth_date: The (fake) identifiers written into DICOM.
        seed: Makes the UIDs deterministic.
        signed: Signed pixels with intercept 0 (and padding outside the field of view), or
            unsigned 12-bit with intercept -1024, the two conventions scanners use.
    """
    import copy

    import nibabel as nib
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    ct_dir = folder / "ct"
    ct_dir.mkdir(parents=True, exist_ok=True)
    z_count, rows, cols = patient.hu.shape
    dr, dc, dz = patient.spacing_mm
    x0, y0, z0 = -dc * (cols - 1) / 2, -dr * (rows - 1) / 2, -150.0
    uids = tuple(_uid(seed, patient_id, k) for k in ("study", "series", "frame"))
    shared = _series_dataset(patient_id, patient_name, birth_date, uids)
    yy, xx = np.mgrid[:rows, :cols]
    outside = (yy - (rows - 1) / 2) ** 2 + (xx - (cols - 1) / 2) ** 2 > (min(rows, cols) / 2) ** 2
    for z in range(z_count):
        sop = _uid(seed, patient_id, "sop", z)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = copy.deepcopy(shared)
        ds.file_meta = meta
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = z_count - z  # head first, as many scanners number them
        ds.ImagePositionPatient = _decimal(x0, y0, z0 + z * dz)
        ds.PixelSpacing = _decimal(dr, dc)
        ds.SliceThickness = _decimal(dz)[0]
        _set_pixels(ds, patient.hu[z], outside, signed)
        ds.save_as(ct_dir / f"IM{z:04d}.dcm", enforce_file_format=True)
    # NIfTI (RAS) of the lesion labels, voxel (i, j, k) = (column, row, slice).
    affine = np.array([[-dc, 0, 0, -x0], [0, -dr, 0, -y0], [0, 0, dz, z0], [0, 0, 0, 1.0]])
    image = nib.Nifti1Image(np.ascontiguousarray(patient.lesions.transpose(2, 1, 0)), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, folder / "lesions.nii.gz")
