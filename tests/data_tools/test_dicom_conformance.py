"""The phantom's CT files and the DICOM SEG pass David Clunie's `dciodvfy` without errors.

`dciodvfy` (Debian package dicom3tools) checks a file against its IOD: the modules and
attributes its SOP class requires and the value representations. CI installs it
(`.ci/run`); without it these tests fail rather than skip, so that a missing tool cannot
pass for a conformant file.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from data_tools.phantom import make_patient, write_patient


@pytest.fixture(scope="module")
def dciodvfy() -> str:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail(
            "dciodvfy not found: install dicom3tools (apt-get install dicom3tools), as .ci/run does"
        )
    return tool


def verify(tool: str, path) -> tuple[list[str], list[str]]:
    """The output lines of `dciodvfy path` and, of those, the errors."""
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return lines, [line for line in lines if line.startswith("Error")]


@pytest.fixture(scope="module")
def patient():
    return make_patient(5, 64, "covid", "moderate")


@pytest.fixture(scope="module", params=[True, False], ids=["signed", "unsigned"])
def ct_folder(request, patient, tmp_path_factory):
    folder = tmp_path_factory.mktemp("signed" if request.param else "unsigned")
    write_patient(
        patient, folder, patient_id="X-1", patient_name="TEST^ONE", seed=3, signed=request.param
    )
    return folder / "ct"


def test_ct_files_have_no_dciodvfy_errors(dciodvfy, ct_folder):
    files = sorted(ct_folder.glob("*.dcm"))
    assert len(files) > 3
    for f in (files[0], files[len(files) // 2], files[-1]):
        lines, errors = verify(dciodvfy, f)
        assert "CTImage" in lines, f"{f.name}: not checked as a CT image:\n" + "\n".join(lines)
        assert not errors, f"{f.name}:\n" + "\n".join(lines)


@pytest.mark.parametrize("research", [False, True], ids=["source-identity", "research"])
def test_seg_from_phantom_ct_has_no_dciodvfy_errors(
    dciodvfy, ct_folder, patient, tmp_path, research
):
    import pydicom

    from tfcovseg.inference.outputs import write_seg
    from tfcovseg.inference.studies import read_input

    volumes, _ = read_input(ct_folder, salt="x")
    volume = volumes[0]
    for ds in volume.datasets:  # free text that names the patient or the hospital
        ds.StudyDescription, ds.InstitutionName = "TEST^ONE chest", "St Elsewhere"
    labels = patient.lesions
    assert labels.shape == volume.hu.shape and labels.any()
    path = tmp_path / "seg.dcm"
    assert write_seg(
        volume,
        labels.astype(np.uint8),
        ["ggo", "consolidation", "fibrosis"],
        path,
        "1",
        research=research,
    )
    lines, errors = verify(dciodvfy, path)
    assert "Segmentation" in lines, "not checked as a SEG:\n" + "\n".join(lines)
    assert not errors, "\n".join(lines)
    seg = pydicom.dcmread(path)
    # The source's patient module by default (a PACS files the SEG with the study); the
    # patient's pseudonym in a research SEG, which still references the source images.
    names = (str(seg.PatientName), str(seg.PatientID), seg.get("PatientBirthDate", ""))
    if research:
        assert names == (volume.patient, volume.patient, "")
        assert seg.PatientIdentityRemoved == "YES"
        # Left out at any depth (the contributing equipment carried InstitutionName too).
        text = str(seg)
        assert "St Elsewhere" not in text and "TEST^ONE" not in text
    else:
        assert names == ("TEST^ONE", "X-1", "19600101")
    assert seg.StudyInstanceUID == volume.datasets[0].StudyInstanceUID
