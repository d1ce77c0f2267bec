"""The converter end to end on the phantom, real COVID-SemiSeg slices, SEG and NIfTI."""

from __future__ import annotations

import concurrent.futures
import csv
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from pydicom.data import get_testdata_file

from data_tools import features
from data_tools.conversion.discovery import ConversionError
from data_tools.conversion.pipeline import convert
from data_tools.convert import main
from data_tools.phantom import cohort_plan, make_patient, write_patient
from data_tools.privacy import pseudonym
from tests.data_tools.conftest import COHORT, KNOWN_ID, KNOWN_NAME, SALT

SEMISEG = Path(__file__).resolve().parents[3] / "shared" / "data" / "covid-semiseg" / "train"


def _examples(record_dir):
    manifest = json.loads((Path(record_dir) / "manifest.json").read_text())
    compression = manifest["compression"] or None
    out = []
    for shard in manifest["shards"]:
        for raw in tf.data.TFRecordDataset(str(Path(record_dir) / shard), compression):
            out.append(features.decode_numpy(raw.numpy()))
    return manifest, out


def _digest(folder):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).iterdir())
        if p.is_file()
    }


def test_records_reproduce_the_phantom(cohort, records):
    out, summary = records
    manifest, examples = _examples(out)
    plan = cohort_plan(COHORT["patients"], COHORT["seed"])
    with (cohort / "manifest.csv").open() as f:
        ids = [row["patient"] for row in csv.DictReader(f)]
    assert summary["patients"] == manifest["num_patients"] == len(plan)
    yy, xx = np.mgrid[:64, :64]
    fov = (yy - 31.5) ** 2 + (xx - 31.5) ** 2 <= 32**2
    for i, ((diagnosis, severity), pid) in enumerate(zip(plan, ids)):
        truth = make_patient(COHORT["seed"] * 100_003 + i, 64, diagnosis, severity)
        pseudo = pseudonym("P", f"dicom:{pid}", SALT.encode())
        mine = sorted(
            (e for e in examples if e["patient/id"] == pseudo), key=lambda e: e["slice/index"]
        )
        assert len(mine) == truth.hu.shape[0] == manifest["patients"][pseudo]["num_slices"]
        for z, e in enumerate(mine):
            np.testing.assert_array_equal(e["hu"][fov], np.rint(truth.hu[z])[fov])
            for c in range(3):
                np.testing.assert_array_equal(e["lesions"][..., c], truth.lesions[z] == c + 1)
            assert e["slice/label"] == int(truth.lesions[z].any())
            assert (e["patient/diagnosis"], e["patient/severity"]) == (diagnosis, severity)
        positions = [e["slice/position_mm"] for e in mine]
        assert np.all(np.diff(positions) > 0)
        lung = np.stack([e["lung"] for e in mine]).astype(bool)
        dice = 2 * (lung & truth.lung).sum() / (lung.sum() + truth.lung.sum())
        assert dice > 0.9
        assert e["spacing_mm"] == pytest.approx([360 / 64, 360 / 64, truth.spacing_mm[2]], rel=1e-5)


def test_manifest_statistics_and_folds(records):
    out, _ = records
    manifest, examples = _examples(out)
    assert manifest["num_slices"] == len(examples) == len(manifest["slices"])
    assert manifest["num_lesion_slices"] == sum(e["slice/label"] for e in examples)
    assert manifest["classes"] == ["ggo", "consolidation", "fibrosis"]
    by_id = {(s["series"], s["index"]): s for s in manifest["slices"]}
    for e in examples:
        entry = by_id[(e["series/id"], e["slice/index"])]
        assert entry["lesion_pixels"] == e["lesions"].reshape(-1, 3).sum(0).tolist()
        assert entry["lung_pixels"] == int(e["lung"].sum())
    for p in manifest["patients"].values():
        if p["diagnosis"] != "covid":
            assert p["lesion_slices"] == 0 and p["volume_ml"]["ggo"] == 0
        assert p["volume_ml"]["lung"] > 1000  # adult lungs: litres
    everyone = set(manifest["patients"])
    for fold in manifest["folds"]["splits"].values():
        parts = [set(fold[s]) for s in ("train", "validation", "test")]
        assert set().union(*parts) == everyone and sum(map(len, parts)) == len(everyone)


def test_privacy_no_identifiers_in_any_output_byte(cohort, records, tmp_path, capsys):
    out, _ = records
    secrets = [KNOWN_ID, KNOWN_NAME, KNOWN_NAME.replace("^", " "), "JOHNATHAN", "19600101"]
    for path in Path(out).iterdir():
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, (secret, path.name)
    # The command line output (and its skip list) is redacted too.
    broken = tmp_path / "in"
    shutil.copytree(cohort / "case_0000", broken / KNOWN_ID)
    (broken / KNOWN_ID / "ct" / "IM0000.dcm").write_bytes(b"garbage")
    assert (
        main(["--input", str(broken), "--out", str(tmp_path / "o"), "--size", "64", "--salt", SALT])
        == 0
    )
    printed = capsys.readouterr()
    assert "skipped 1 files" in printed.out
    for secret in secrets:
        assert secret not in printed.out + printed.err
    assert "<patient>" in printed.out or "P" in printed.out


def test_rerun_is_byte_identical_and_replaces_old_shards(cohort, records, tmp_path):
    out, _ = records
    again = tmp_path / "again"
    convert(cohort, again, size=64, salt=SALT, progress=False)
    assert _digest(again) == _digest(out)
    convert(cohort, again, size=64, salt=SALT, progress=False)
    assert _digest(again) == _digest(out)
    convert(cohort, again, size=64, salt=SALT, shards=3, progress=False)
    names = sorted(p.name for p in again.iterdir())
    assert names == ["manifest.json"] + [f"slices-{i:05d}-of-00003.tfrecord" for i in range(3)]
    manifest, examples = _examples(again)
    assert len(examples) == manifest["num_slices"]
    assert len({e["slice/id"] for e in examples}) == len(examples)  # no duplicates


def _interrupt_encoding_after(n: int, monkeypatch) -> dict:
    """A Ctrl-C in the converting process at its (n + 1)-th example; the count so far."""
    calls = {"n": 0}
    real = features.encode_example

    def interrupted(fields):
        calls["n"] += 1
        if calls["n"] > n:
            raise KeyboardInterrupt
        return real(fields)

    monkeypatch.setattr(features, "encode_example", interrupted)
    return calls


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_run_leaves_previous_output_intact(
    cohort, records, tmp_path, monkeypatch, workers
):
    # With 2 workers the converting process is interrupted in a study of its own while
    # the pool worker (which does not see the patch) writes its studies' files.
    out, _ = records
    target = tmp_path / "target"
    shutil.copytree(out, target)
    before = _digest(target)
    calls = _interrupt_encoding_after(30, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        convert(cohort, target, size=64, salt=SALT, shards=2, workers=workers, progress=False)
    assert calls["n"] > 30
    assert _digest(target) == before
    assert not list(target.glob(".partial-*"))


def test_a_kill_while_the_records_are_swapped_keeps_the_earlier_output(
    cohort, records, tmp_path, monkeypatch
):
    """A run (another salt: same shard names, other records) killed between moving its
    shards in and writing its manifest left the earlier manifest beside the new shards,
    the earlier shards deleted: a folder that read as finished, and was not."""
    from data_tools.conversion import swap

    out, _ = records
    target = tmp_path / "target"
    shutil.copytree(out, target)
    before = _digest(target)
    real_write = swap.atomic_write_json

    def killed(path, *args, **kwargs):
        if Path(path).name == "manifest.json":
            raise KeyboardInterrupt  # a Ctrl-C: the run puts the earlier output back
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(swap, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        convert(cohort, target, size=64, salt="another-salt-0123", progress=False)
    assert _digest(target) == before and not list(target.glob(".partial-*"))
    # A SIGKILL there: no cleanup runs; the folder has no manifest (it reads as unfinished).
    monkeypatch.setattr(swap, "discard_partial", lambda *args: None)
    with pytest.raises(KeyboardInterrupt):
        convert(cohort, target, size=64, salt="another-salt-0123", progress=False)
    assert not (target / "manifest.json").exists()
    monkeypatch.undo()
    # The next run, whatever becomes of it, starts by putting the earlier output back.
    _interrupt_encoding_after(5, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        convert(cohort, target, size=64, salt="a-third-salt-456", progress=False)
    assert _digest(target) == before and not list(target.glob(".partial-*"))


def test_parallel_workers_give_the_same_output(cohort, records, tmp_path):
    out, _ = records
    convert(cohort, tmp_path / "par", size=64, salt=SALT, workers=2, progress=False)
    assert _digest(tmp_path / "par") == _digest(out)
    # Compressed, the workers' pieces (one gzip member per study) join into the same shards
    for workers in (1, 2):
        convert(cohort, tmp_path / f"gz{workers}", size=64, salt=SALT, workers=workers,
                compression="GZIP", progress=False)  # fmt: skip
    assert _digest(tmp_path / "gz1") == _digest(tmp_path / "gz2")
    assert not list((tmp_path / "gz2").glob(".partial-*"))  # the pieces are gone


def test_bad_inputs_are_skipped_with_reasons(cohort, tmp_path):
    src = tmp_path / "in"
    shutil.copytree(cohort / "case_0001", src / "good")
    shutil.copytree(cohort / "case_0002", src / "badmask")
    bad = nib.load(src / "badmask" / "lesions.nii.gz")
    nib.save(
        nib.Nifti1Image(np.zeros((10, 10, 3), np.uint8), bad.affine),
        src / "badmask" / "lesions.nii.gz",
    )
    (src / "junk").mkdir()
    (src / "junk" / "readme.bin").write_text("hello")
    shutil.copy(get_testdata_file("MR_small.dcm"), src / "junk" / "mr.dcm")
    shutil.copy(get_testdata_file("rtplan.dcm"), src / "junk" / "plan.dcm")
    ct = sorted((src / "good" / "ct").glob("*.dcm"))
    ct[3].write_bytes(ct[3].read_bytes()[:-3000])  # truncated pixel data
    summary = convert(src, tmp_path / "out", size=64, salt=SALT, progress=False)
    reasons = {item["path"]: item["reason"] for item in summary["skipped"]}
    assert reasons["junk/readme.bin"] == "not a DICOM file"
    assert "modality MR is not CT" in reasons["junk/mr.dcm"]
    assert "not an image" in reasons["junk/plan.dcm"]
    # A mask that does not fit is left out; its series is converted without masks.
    assert "covers only part of the series" in reasons["badmask/lesions.nii.gz"]
    assert any(p.endswith(ct[3].name) for p in reasons)
    assert summary["patients"] == 2
    n = len(list((cohort / "case_0001" / "ct").glob("*.dcm")))
    n_bad = len(list((cohort / "case_0002" / "ct").glob("*.dcm")))
    assert summary["slices"] == n - 1 + n_bad
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sorted(e["annotated"] for e in manifest["patients"].values()) == [False, True]
    with pytest.raises(ConversionError, match="--strict"):
        convert(src, tmp_path / "strict", size=64, salt=SALT, strict=True, progress=False)
    assert not (tmp_path / "strict" / "manifest.json").exists()


def test_nothing_usable_is_an_error(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt.bin").write_text("x")
    assert main(["--input", str(tmp_path / "in"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no usable CT series" in err and "not a DICOM file" in err
    assert main(["--input", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_labels_file_with_bad_diagnosis_names_the_line(cohort, tmp_path):
    src = tmp_path / "in"
    shutil.copytree(cohort / "case_0001", src / "a")
    (src / "labels.csv").write_text("patient,diagnosis,severity\nPHANTOM-0001,flu,none\n")
    with pytest.raises(ConversionError, match=r"labels.csv line 2: diagnosis 'flu'"):
        convert(src, tmp_path / "o", size=64, salt=SALT, progress=False)


def test_gzip_shards(cohort, tmp_path):
    convert(cohort, tmp_path / "gz", size=64, salt=SALT, compression="GZIP", progress=False)
    shards = sorted((tmp_path / "gz").glob("*.tfrecord.gz"))
    assert shards and shards[0].read_bytes()[:2] == b"\x1f\x8b"
    manifest, examples = _examples(tmp_path / "gz")
    assert len(examples) == manifest["num_slices"] and manifest["compression"] == "GZIP"


def test_resizing_to_another_size(cohort, tmp_path):
    src = tmp_path / "in"
    shutil.copytree(cohort / "case_0000", src / "a")
    convert(src, tmp_path / "o", size=32, salt=SALT, progress=False)
    manifest, examples = _examples(tmp_path / "o")
    assert all(e["hu"].shape == (32, 32) and e["lesions"].shape == (32, 32, 3) for e in examples)
    assert set(np.unique(np.stack([e["lesions"] for e in examples]))) <= {0, 1}
    assert examples[0]["spacing_mm"][0] == pytest.approx(360 / 32, rel=1e-5)


def test_dicom_seg_masks(tmp_path):
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    p = make_patient(31, 64, "covid", "severe", n_slices=8)
    write_patient(p, tmp_path / "in" / "case", patient_id="SEG-1", patient_name="S^T")
    (tmp_path / "in" / "case" / "lesions.nii.gz").unlink()
    sources = [pydicom.dcmread(f) for f in sorted((tmp_path / "in" / "case" / "ct").glob("*"))]
    sources.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    descriptions = []
    for number, label in enumerate(["ground glass opacity", "consolidation", "fibrosis"], 1):
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=label,
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Lesion,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            )
        )
    pixels = np.stack([p.lesions == k for k in (1, 2, 3)], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=2,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="tfcovseg tests",
        manufacturer_model_name="phantom",
        software_versions="0",
        device_serial_number="0",
    )
    seg.save_as(tmp_path / "in" / "case" / "seg.dcm")
    convert(tmp_path / "in", tmp_path / "o", size=64, salt=SALT, progress=False)
    manifest, examples = _examples(tmp_path / "o")
    examples.sort(key=lambda e: e["slice/index"])
    assert len(examples) == 8 and manifest["patients"][examples[0]["patient/id"]]["annotated"]
    for z, e in enumerate(examples):
        for c in range(3):
            np.testing.assert_array_equal(e["lesions"][..., c], p.lesions[z] == c + 1)


def test_nifti_volume_with_mask(tmp_path):
    p = make_patient(41, 64, "covid", "moderate", n_slices=7)
    affine = np.diag([-2.0, -2.0, 5.0, 1.0])
    # Stored as (x: right->left reversed, y, z) voxels in RAS; then as_closest_canonical flips.
    volume = p.hu.transpose(2, 1, 0)
    labels = p.lesions.transpose(2, 1, 0)
    (tmp_path / "in").mkdir()
    nib.save(
        nib.Nifti1Image(np.rint(volume).astype(np.int16), affine), tmp_path / "in" / "ct01.nii.gz"
    )
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "in" / "ct01_mask.nii.gz")
    convert(tmp_path / "in", tmp_path / "o", size=64, salt=SALT, progress=False)
    manifest, examples = _examples(tmp_path / "o")
    examples.sort(key=lambda e: e["slice/index"])
    assert len(examples) == 7 and manifest["num_patients"] == 1
    for z, e in enumerate(examples):
        np.testing.assert_array_equal(e["hu"], np.rint(p.hu[z]).astype(np.int16))
        np.testing.assert_array_equal(e["lesions"][..., 0], p.lesions[z] == 1)
    assert examples[0]["spacing_mm"] == pytest.approx([2.0, 2.0, 5.0])


def test_covid_semiseg_slices(tmp_path):
    if not SEMISEG.is_dir():
        pytest.skip(f"COVID-SemiSeg slices not found at {SEMISEG}")
    from PIL import Image

    summary = convert(
        SEMISEG,
        tmp_path / "o",
        size=64,
        salt=SALT,
        classes=("ggo", "consolidation"),
        default_diagnosis="covid",
        progress=False,
    )
    assert summary["patients"] == summary["slices"] == 50 and not summary["skipped"]
    manifest, examples = _examples(tmp_path / "o")
    assert all(e["image/pre_windowed"] == 1 for e in examples)
    assert manifest["patients"][examples[0]["patient/id"]]["diagnosis"] == "covid"
    fractions = []
    for name in sorted((SEMISEG / "GT").glob("*.png"))[:50]:
        gt = np.asarray(Image.open(name))
        fractions.append([(gt == 1).mean(), (gt == 2).mean()])
    stored = [e["lesions"].reshape(-1, 2).mean(0) for e in examples]
    np.testing.assert_allclose(np.mean(stored, 0), np.mean(fractions, 0), atol=0.01)
    assert max(e["hu"].max() for e in examples) <= 255 and min(e["hu"].min() for e in examples) >= 0


def _slice_dataset(root, n, size, masked=None):
    """``Imgs/<k>.jpg`` (random grey levels) for k < n and, for the first `masked` of them
    (all by default), ``GT/<k>.png`` marking a GGO square and a consolidation square."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for folder in ("Imgs", "GT"):
        (root / folder).mkdir(parents=True)
    gt = np.zeros((size, size), np.uint8)
    gt[size // 8 : size // 3, size // 8 : size // 3] = 1
    gt[size // 2 : 3 * size // 4, size // 2 : 3 * size // 4] = 2
    for k in range(n):
        image = rng.integers(0, 255, (size, size), dtype=np.uint8)
        Image.fromarray(image).save(root / "Imgs" / f"{k}.jpg")
        if k < (n if masked is None else masked):
            Image.fromarray(gt).save(root / "GT" / f"{k}.png")


def test_a_class_no_mask_marks_is_warned_of(tmp_path, capsys):
    """COVID-SemiSeg-style slices (GT labels 1 and 2) converted with the default three
    classes: fibrosis is recorded as absent on every slice; the summary says so and
    names the --classes that fit the masks (it said nothing)."""
    from PIL import Image

    from data_tools.conversion.pipeline import print_summary

    rng = np.random.default_rng(0)
    for folder in ("Imgs", "GT"):
        (tmp_path / "in" / folder).mkdir(parents=True)
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(
            tmp_path / "in" / "Imgs" / f"{k}.jpg"
        )
        gt = np.zeros((40, 40), np.uint8)
        gt[5:15, 5:15], gt[20:30, 20:30] = 1, 2
        Image.fromarray(gt).save(tmp_path / "in" / "GT" / f"{k}.png")
    common = dict(size=32, salt=SALT, default_diagnosis="covid", progress=False)
    summary = convert(tmp_path / "in", tmp_path / "o3", **common)
    assert summary["unmarked_classes"] == ["fibrosis"]
    print_summary(summary)
    printed = capsys.readouterr().out
    assert "no mask marks fibrosis" in printed and "--classes ggo,consolidation" in printed
    fitted = convert(tmp_path / "in", tmp_path / "o2", classes=("ggo", "consolidation"), **common)
    assert fitted["unmarked_classes"] == []
    # Labels 1 and 3 (ggo, fibrosis): dropping consolidation would make 3 out of range;
    # the advice says how labels map instead (it said --classes ggo,fibrosis).
    for k in range(3):
        gt = np.asarray(Image.open(tmp_path / "in" / "GT" / f"{k}.png")).copy()
        gt[gt == 2] = 3
        Image.fromarray(gt).save(tmp_path / "in" / "GT" / f"{k}.png")
    middle = convert(tmp_path / "in", tmp_path / "o4", **common)
    assert middle["unmarked_classes"] == ["consolidation"]
    print_summary(middle)
    printed = capsys.readouterr().out
    assert "--classes ggo,fibrosis" not in printed and "in that order" in printed


def test_unlabelled_slices_are_marked_and_grouped_by_volume(tmp_path, capsys):
    """Imgs/ without GT/ (COVID-SemiSeg's unlabelled split): records with annotated 0,
    the slices of one volume one patient (patient-level folds), numbered slices apart."""
    from PIL import Image

    from data_tools.conversion.discovery import slice_volume
    from data_tools.conversion.pipeline import print_summary

    rng = np.random.default_rng(0)
    (tmp_path / "in" / "Imgs").mkdir(parents=True)
    names = [f"Data-1_coronacases_org_00{v}_{k}" for v in (1, 2) for k in (1, 2, 10)]
    for name in names + ["7"]:
        image = rng.integers(0, 120, (40, 36), dtype=np.uint8)
        Image.fromarray(image).save(tmp_path / "in" / "Imgs" / f"{name}.jpg")
    summary = convert(
        tmp_path / "in", tmp_path / "o", size=32, salt=SALT, classes=("ggo", "consolidation"),
        default_diagnosis="covid", progress=False,
    )  # fmt: skip
    assert summary["slices"] == 7 and summary["unlabelled_slices"] == 7
    assert summary["patients"] == 3  # two volumes and the numbered slice
    manifest, examples = _examples(tmp_path / "o")
    assert all(e["mask/annotated"] == 0 for e in examples)
    sizes = sorted(p["num_slices"] for p in manifest["patients"].values())
    assert sizes == [1, 3, 3]
    assert not any(p["annotated"] for p in manifest["patients"].values())
    print_summary(summary)
    assert "7 unlabelled: no lesion mask" in capsys.readouterr().out
    assert slice_volume("Data-1_radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm_12") == (
        "Data-1_radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm"
    )
    assert slice_volume("10") is None and slice_volume("case_") is None


def test_a_labelled_slice_without_its_mask_is_warned_of(tmp_path, capsys):
    """Imgs/ with GT/ where one image has no mask: it converts as unlabelled with a
    warning naming it, and --strict refuses the input (it became unlabelled silently,
    even under --strict)."""
    from data_tools.conversion.pipeline import print_summary

    _slice_dataset(tmp_path / "in", 2, 32, masked=1)
    common = dict(size=32, salt=SALT, default_diagnosis="covid", progress=False)
    summary = convert(tmp_path / "in", tmp_path / "o", **common)
    assert summary["unlabelled_slices"] == 1
    print_summary(summary)
    printed = capsys.readouterr().out
    # Named by its pseudonym, as every slice of a slice dataset is (its own patient).
    assert (
        len(re.findall(r"warning: P[0-9a-f]+: no mask beside it in the GT/ folder", printed)) == 1
    )
    assert "Imgs/" not in printed
    # Many slices with one warning: five named, the rest counted.
    from data_tools.conversion.pipeline import SAME_WARNING_SHOWN

    same = [{"path": f"P{k}", "warning": "one text"} for k in range(SAME_WARNING_SHOWN + 3)]
    print_summary({**summary, "warnings": same})
    lines = [line for line in capsys.readouterr().out.splitlines() if "one text" in line]
    assert len(lines) == SAME_WARNING_SHOWN + 1 and "3 more with the same warning" in lines[-1]
    with pytest.raises(ConversionError, match="--strict: P[0-9a-f]+: no mask beside it") as e:
        convert(tmp_path / "in", tmp_path / "o2", strict=True, **common)
    assert "Imgs/" not in str(e.value)  # it named the file: --strict ran before the pseudonyms
    assert not (tmp_path / "o2").exists()


def test_masks_are_found_in_any_case_and_in_labels(tmp_path):
    """GT/1.PNG beside Imgs/1.jpg, or masks in Labels/, were not found (the slice became
    unlabelled, and now would be warned of as missing its mask)."""
    from PIL import Image

    from data_tools.conversion.discovery import discover

    gt = np.zeros((32, 32), np.uint8)
    gt[4:12, 4:12] = 1
    for layout, mask_name in (("a", "GT/1.PNG"), ("b", "Labels/1.png"), ("c", "gt/1.png")):
        root = tmp_path / layout
        (root / "Imgs").mkdir(parents=True)
        (root / mask_name).parent.mkdir()
        Image.fromarray(gt).save(root / "Imgs" / "1.jpg")
        Image.fromarray(gt).save(root / mask_name, format="PNG")
        (study,) = discover(root).studies
        assert study.mask_path == root / mask_name and not study.warnings, layout


def test_a_misspelt_class_is_warned_of(tmp_path, capsys):
    """--classes ggo,consolidaton named the records' second class "consolidaton" without a
    word (only "no mask marks it", with the advice to drop it); "infection" (one class) and
    the three lesion types pass quietly."""
    _slice_dataset(tmp_path / "in", 1, 32)
    args = ["--input", str(tmp_path / "in"), "--size", "32", "--salt", SALT, "--folds", "2"]
    assert main([*args, "--out", str(tmp_path / "o"), "--classes", "ggo,consolidaton"]) == 0
    err = capsys.readouterr().err
    assert "warning: --classes consolidaton: not a lesion type" in err
    assert main([*args, "--out", str(tmp_path / "o2"), "--classes", "ggo,consolidation"]) == 0
    assert "not a lesion type" not in capsys.readouterr().err
    _binary_mask_slices(tmp_path / "bin")
    args[1] = str(tmp_path / "bin")
    assert main([*args, "--out", str(tmp_path / "o3"), "--classes", "infection"]) == 0
    assert "not a lesion type" not in capsys.readouterr().err


def _binary_mask_slices(folder, n=2, size=32):
    """Imgs/N.png + GT/N.png with 0/255 (infection-only) masks, as Inf-Net's data."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "Imgs").mkdir(parents=True)
    (folder / "GT").mkdir()
    masks = []
    for i in range(n):
        image = rng.integers(0, 256, (size, size), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        mask[4 + i : 12 + i, 8:20] = 255
        Image.fromarray(image).save(folder / "Imgs" / f"{i}.png")
        Image.fromarray(mask).save(folder / "GT" / f"{i}.png")
        masks.append(mask == 255)
    return masks


def test_binary_masks_need_a_single_class(tmp_path):
    truth = _binary_mask_slices(tmp_path / "in")
    kwargs = dict(size=32, salt=SALT, default_diagnosis="covid", progress=False)
    # Several classes: a 0/255 mask cannot say which one a pixel is, so no slice is kept
    # (before, every lesion pixel silently became GGO).
    with pytest.raises(ConversionError) as err:
        convert(tmp_path / "in", tmp_path / "multi", classes=("ggo", "consolidation"), **kwargs)
    # (The study is named by its pseudonym: folder names may be patient names.)
    assert "all 2 failed" in str(err.value)
    assert "binary 0/255 mask" in str(err.value) and "--classes" in str(err.value)
    assert not (tmp_path / "multi" / "manifest.json").exists()
    # One class: the mask is that class.
    summary = convert(tmp_path / "in", tmp_path / "one", classes=("infection",), **kwargs)
    assert summary["slices"] == 2 and not summary["skipped"]
    _, examples = _examples(tmp_path / "one")
    stored = sorted(e["lesions"][..., 0].sum() for e in examples)
    assert stored == sorted(int(m.sum()) for m in truth)


def test_the_converting_process_shares_the_studies_and_keeps_their_order():
    """`workers.ordered_map`: results in order; the pool gets its own version of each job (the
    one that writes a file); this process converts studies too, never holding many."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from data_tools import workers as module

    held = []

    def fn(x):
        time.sleep(0.002 * (x % 5))  # studies of different sizes
        return x, threading.current_thread() is threading.main_thread()

    items = list(range(40))
    with ThreadPoolExecutor(1) as pool:
        results = []
        mapped = module.ordered_map(fn, items, pool, 2, [-x for x in items])
        for r in mapped:
            results.append(r)
            held.append(mapped.gi_frame.f_locals["done"].copy() if mapped.gi_frame else {})
    assert [abs(x) for x, _ in results] == items
    here = [x for x, main in results if main]
    assert here and all(x >= 0 for x in here)  # here: the plain job
    assert all(x <= 0 for x, main in results if not main)  # pool: its version
    assert len(here) < len(items)
    assert max(len(h) for h in held) <= 4
    assert list(module.ordered_map(fn, items, None, 1)) == [(x, True) for x in items]


def test_channel_counts_of_a_slice():
    """The manifest's lesion pixels per class (OpenCV's channel sums up to 4 classes)."""
    from data_tools.conversion.reading import _channel_counts

    rng = np.random.default_rng(0)
    for channels in (0, 1, 3, 4, 5):
        lesions = (rng.random((33, 47, channels)) < 0.2).astype(np.uint8)
        expected = [int(np.count_nonzero(lesions[..., c])) for c in range(channels)]
        assert _channel_counts(lesions) == expected
        assert all(isinstance(v, int) for v in _channel_counts(lesions))


class _StalledPool:
    """A pool whose worker never answers (still starting, say): its futures never end."""

    def __init__(self):
        self.futures = []

    def submit(self, fn, *args):
        future = _NeverDone()
        self.futures.append(future)
        return future


class _NeverDone(concurrent.futures.Future):
    def result(self, timeout=None):
        raise AssertionError("waited for a pool worker that does not answer")


def test_header_reads_do_not_wait_for_a_worker_that_has_not_answered():
    """`workers.ordered_map(redo=True)` (the discovery's header reads): with nothing left to
    start, this process reads the next chunk in order itself rather than wait for a pool
    worker that has not answered it; without `redo` (studies: a worker's version writes
    files) it waits."""
    from data_tools import workers as module

    items = list(range(10))
    pool = _StalledPool()
    mapped = module.ordered_map(lambda x: x * x, items, pool, 2, hold=len(items), redo=True)
    assert list(mapped) == [x * x for x in items]
    assert pool.futures and all(f.cancelled() for f in pool.futures)
    with pytest.raises(AssertionError, match="does not answer"):
        list(module.ordered_map(lambda x: x * x, items, _StalledPool(), 2, hold=len(items)))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
def test_freed_memory_is_reused_after_reuse_freed_memory():
    """`reuse_freed_memory`: a 40 MB array allocated again after it was freed comes from
    the heap (no page faults) instead of new pages from the kernel each time (glibc maps
    arrays over 32 MB afresh, whatever it saw before)."""
    # NumPy asks for 2 MB pages for large arrays: off, so that faults count 4 KB pages.
    code = (
        "import resource, sys\n"
        "import numpy as np\n"
        "from data_tools.convert import reuse_freed_memory\n"
        "(np._core if hasattr(np, '_core') else np.core).multiarray._set_madvise_hugepage(False)\n"
        "threshold = reuse_freed_memory() if sys.argv[1] == 'reuse' else 0\n"
        "np.ones(40 << 20, np.uint8)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(5):\n"
        "    np.ones(40 << 20, np.uint8)\n"
        "print(threshold, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    answers = {}
    for mode in ("default", "reuse"):
        run = subprocess.run(
            [sys.executable, "-c", code, mode], capture_output=True, text=True, check=True
        )
        answers[mode] = [int(v) for v in run.stdout.split()[-2:]]
    threshold, faults = answers["reuse"]
    if threshold == 0:
        pytest.skip("not glibc: nothing to set")
    assert answers["default"][1] > 5 * 5000  # 10,240 pages of 4 KB a time
    if threshold < 40 << 20:
        assert faults > 5 * 5000  # this glibc keeps such arrays mapped afresh
    else:
        assert faults < 1000


def test_a_second_run_into_a_folder_being_written_is_refused(cohort, records, tmp_path):
    from data_tools.files import exclusive_folder

    out, _ = records
    target = tmp_path / "target"
    shutil.copytree(out, target)
    before = _digest(target)
    with exclusive_folder(target):  # a first run, still converting
        work = target / ".partial-1"
        work.mkdir()
        (work / "slices-00000-of-00003.tfrecord").write_bytes(b"in progress")
        with pytest.raises(
            ConversionError, match=f"--out {target} is being written by another run"
        ):
            convert(cohort, target, size=64, salt=SALT, progress=False)
        assert (work / "slices-00000-of-00003.tfrecord").read_bytes() == b"in progress"
        assert _digest(target) == before
    # Once it has ended (here: killed, its work left behind), a run goes ahead and tidies.
    convert(cohort, target, size=64, salt=SALT, progress=False)
    assert not work.exists() and _digest(target) == before
    assert sorted(p.name for p in target.iterdir() if p.name.startswith(".")) == []


def test_headers_read_by_the_workers_warn_redacted(cohort, tmp_path, capfd):
    # Every file's StudyInstanceUID is malformed and quoted by pydicom's warning when the
    # header is read: in the pool's processes as well as here (--workers 2).
    import pydicom

    src = tmp_path / "in"
    shutil.copytree(cohort, src)
    secret = "1.2.840.SECRET-UID-77"
    for f in sorted(src.rglob("IM*.dcm")):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = secret
        ds.save_as(f)
    capfd.readouterr()
    args = ["--input", str(src), "--out", str(tmp_path / "o"), "--size", "64", "--salt", SALT]
    assert main(args + ["--workers", "2"]) == 0
    printed = capfd.readouterr()
    assert secret not in printed.out + printed.err
    assert "Invalid value for VR UI: '<uid>'" in printed.err
    # Once: pydicom logs it and warns it (both were shown), in every file; with how many
    # files and the first (it named none).
    assert printed.err.count("Invalid value for VR UI: '<uid>'") == 1
    files = len(list(src.rglob("IM*.dcm")))
    assert re.search(rf"'<uid>'.* \({files} files, e\.g\. case_\d+/ct/IM\w+\.dcm\)", printed.err)
    serial = tmp_path / "serial"
    assert main(args[:3] + [str(serial)] + args[4:]) == 0
    assert _digest(serial) == _digest(tmp_path / "o")


def test_the_redactor_finds_what_one_alternation_found_and_names_as_written():
    """Identifiers of digits and dots are looked up run by run (one alternation of an
    archive's millions of UIDs took seconds to build and 150 ms a call at 50,000): the
    same replacements as the alternation of every identifier, leftmost and longest; names
    also in other case and order, as folders are often named."""
    import random

    from data_tools.privacy import Redactor

    rng = random.Random(0)
    uids = [
        ".".join(str(rng.randint(0, 999)) for _ in range(rng.randint(2, 6))) for _ in range(300)
    ]
    ids = ["12345", "PHANTOM-0001", "AB12.3", "DOE^JOHN", "99CT", "İBRAHİM^AYŞE", "0123"]
    redactor = Redactor()
    for i, uid in enumerate(uids):
        redactor.add(uid, f"<uid{i}>")
    for value in ids:
        redactor.add(value, "<patient>")
    mapping = {**{u: f"<uid{i}>" for i, u in enumerate(uids)}, **{v: "<patient>" for v in ids}}
    uids.append("1.2.840.99")  # a UID a name overlaps: one pass takes the leftmost
    redactor.add(uids[-1], f"<uid{len(uids) - 1}>")
    mapping[uids[-1]] = f"<uid{len(uids) - 1}>"
    for name in ("DOE^JOHN", "İBRAHİM^AYŞE"):
        mapping[name.replace("^", " ")] = mapping[name.replace("^", "_")] = "<patient>"
    keys = sorted((k for k in mapping if len(k) >= 3), key=len, reverse=True)
    alternation = re.compile("|".join(map(re.escape, keys)))
    pieces = uids[:40] + uids[-1:] + ids + ["DOE JOHN", "İBRAHİM AYŞE", "P0", "1", ".", "x"]
    pieces += ["/", "7", "99", " ", "_", "AB", "CT"]
    for _ in range(500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        expected = alternation.sub(lambda m: mapping[m.group(0)], text)
        assert redactor(text) == expected, text
    assert redactor("Doe_John/john doe/JOHN_DOE.txt") == "<patient>/<patient>/<patient>.txt"
    # Letters whose lower case re and str disagree on (a KeyError stopped the run).
    redactor.add("YILDIZ^AYSE", "<patient>")
    assert redactor("Yıldız_Ayse/notes.bin") == "<patient>/notes.bin"
    # Keys that differ in case share the engine's path: the longest still wins.
    cased = Redactor()
    cased.add("Doe", "<patient>")
    cased.add("DOE^JOHN", "<patient>")
    assert cased("DOE JOHN, doe") == "<patient>, <patient>"
    for k in range(20_000):
        redactor.add(f"1.2.826.0.1.{k}", "<uid>")
    pattern = redactor._pattern
    assert redactor("IM 1.2.826.0.1.19999.5: bad") == "IM <uid>.5: bad"
    assert redactor("again") == "again" and redactor._pattern is pattern  # built once


def test_held_warnings_are_shown_once_with_their_file_or_how_many():
    from data_tools.privacy import Redactor, warning_lines

    redactor = Redactor()
    redactor.add("SECRET", "<patient>")
    held = [
        ("pydicom: bad SECRET", "a/1.dcm"),
        ("UserWarning: bad SECRET", "a/1.dcm"),  # pydicom logs and warns it: one
        ("pydicom: bad SECRET", "a/2.dcm"),
        ("pydicom: other", "SECRET/3.dcm"),
        "UserWarning: not about a file",
    ]
    assert warning_lines(held, redactor) == [
        "pydicom: bad <patient> (2 files, e.g. a/1.dcm)",
        "<patient>/3.dcm: pydicom: other",
        "UserWarning: not about a file",
    ]


def test_a_pool_worker_appends_to_its_shard_only_when_its_turn_has_come(cohort, tmp_path):
    import dataclasses

    from data_tools.conversion import shards as module
    from data_tools.conversion.discovery import discover
    from data_tools.features import LESION_CLASSES

    study = discover(cohort).studies[0]
    spill, shard, after, done = (tmp_path / n for n in ("spill", "shard", "after", "done"))
    job = module.StudyJob(
        study, 64, LESION_CLASSES, "P1", b"key", "", spill, shard=shard, after=after, done=done
    )
    encoded, reason, _ = module.safe_process(job)  # the shard's study before it: not in yet
    assert reason is None and not encoded.appended and encoded.path == str(spill)
    assert not shard.exists() and not done.exists()
    after.touch()  # now it is
    encoded, _, _ = module.safe_process(job)
    assert encoded.appended and encoded.path is None and encoded.examples is None
    assert done.exists() and shard.read_bytes() == spill.read_bytes()
    first = dataclasses.replace(job, after=None, shard=tmp_path / "first")  # first in its shard
    assert module.safe_process(first)[0].appended


def test_integer_hu_are_read_as_int16_and_others_as_float32(cohort, tmp_path):
    """The converter keeps integer HU in int16 (what the records store, without float32 and
    back) and reads a series with a fractional rescale slope in float32, values unchanged."""
    import pydicom

    from data_tools.conversion.discovery import discover
    from data_tools.conversion.reading import _read_dicom_study

    study = discover(cohort).studies[0]
    volume = _read_dicom_study(study, features.LESION_CLASSES).hu
    assert volume.dtype == np.int16
    floats = np.stack([h.read_hu() for h in study.series.slices])
    np.testing.assert_array_equal(volume, floats)
    for path in {h.path.parent for h in study.series.slices}:
        shutil.copytree(path, tmp_path / path.name)
    for f in tmp_path.rglob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.RescaleSlope = 0.5
        ds.save_as(f)
    halved = discover(tmp_path).studies[0]
    volume = _read_dicom_study(halved, features.LESION_CLASSES).hu
    assert volume.dtype == np.float32
    halves = np.stack([h.read_hu() for h in halved.series.slices])
    np.testing.assert_array_equal(volume, halves)
    assert not np.array_equal(halves, np.rint(halves))  # fractions kept
    # A file whose header promised integer HU changes before its pixels are read: the
    # study is read again in float32, nothing rounded.
    for f in tmp_path.rglob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.RescaleSlope = 1
        ds.save_as(f)
    promised = discover(tmp_path).studies[0]
    assert all(h.integer_hu for h in promised.series.slices)
    changed = promised.series.slices[3].path
    ds = pydicom.dcmread(changed)
    ds.RescaleSlope = 0.5
    ds.save_as(changed)
    volume = _read_dicom_study(promised, features.LESION_CLASSES).hu
    assert volume.dtype == np.float32
    np.testing.assert_array_equal(volume[3], halves[3])
    np.testing.assert_array_equal(volume[2], floats[2])


def test_a_pool_worker_reads_headers_before_loading_the_converter(cohort):
    """A spawned worker's first tasks, discovery's header reads, import pydicom and NumPy
    only (`data_tools.workers`): OpenCV, nibabel and the converter come with its first
    study. It helps discovery 0.06 s sooner that way."""
    from data_tools.workers import scan_chunk, worker_pool

    files = sorted(cohort.rglob("*.dcm"))[:3]
    loaded = "sorted(m for m in {!r} if m in __import__('sys').modules)"
    heavy = (
        "cv2",
        "nibabel",
        "data_tools.convert",
        "data_tools.conversion.reading",
        "data_tools.lung",
    )
    with worker_pool(2) as pool:
        scanned, _ = pool.submit(scan_chunk, files).result()
        assert [s.kind for s in scanned] == ["ct"] * 3
        assert pool.submit(eval, loaded.format(heavy)).result() == []
        assert pool.submit(eval, loaded.format(("pydicom",))).result() == ["pydicom"]


def test_pool_workers_do_not_run_the_calling_script_again(cohort, tmp_path):
    """A script calling `convert(workers=2)`: its top-level code (a training script's
    TensorFlow import, say) runs once, not again in each spawned worker, and its main
    module is itself again afterwards. It ran in every worker before: from a script
    importing TensorFlow two workers were slower than one."""
    marker = tmp_path / "ran.txt"
    script = tmp_path / "caller.py"
    script.write_text(
        "import os, sys\n"
        "with open(sys.argv[2], 'a') as f:\n"
        "    f.write(f'{os.getpid()}\\n')\n"
        "from data_tools.convert import convert\n"
        "if __name__ == '__main__':\n"
        "    convert(sys.argv[1], sys.argv[3], size=64, salt='s', workers=2, progress=False)\n"
        "    assert sys.modules['__main__'].__file__ == __file__\n"
    )
    subprocess.run(
        [sys.executable, str(script), str(cohort), str(marker), str(tmp_path / "out")],
        check=True,
        timeout=300,
    )
    assert len(marker.read_text().split()) == 1
    assert (tmp_path / "out" / "manifest.json").is_file()
