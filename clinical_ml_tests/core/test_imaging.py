"""PACS imaging through the landing zone and the boundary: the marker lists DICOM files by path, ingestion
checks each file on its own (one bad file never touches the others), and the release de-identifies them under
the patient's pseudonym and date shift, with consent, suppression and the identifier gate applied."""

import dataclasses
import json
import shutil
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pydicom
import pytest
from pydicom.dataset import Dataset

from clinical_ml.core.anonymization import Vault
from clinical_ml.core.deid_release import release_batch
from clinical_ml.core.delivery import ZonePaths, accepted_path, process_batch, process_file
from clinical_ml.core.dicom import (
    DICOM_SUFFIX,
    IMAGING_FOLDER,
    UID_ROOT,
    ImagingInstance,
    deidentify,
    read_header,
    write_dicom,
)
from clinical_ml.core.imaging import (
    FILE_REASONS,
    accepted_instances,
    process_imaging,
    publish_imaging,
    staging_folder,
    withdraw_imaging,
)
from clinical_ml.core.ingestion import empty_accepted
from clinical_ml.core.landing import (
    COMPLETION_MARKER,
    SOURCES,
    LandingBatch,
    inspect_batch,
    listed_name_ok,
    read_unmarked_batch,
)
from clinical_ml.core.reidentification import RiskPolicy
from clinical_ml.core.row_accounting import batch_account
from clinical_ml.core.synthetic import (
    SyntheticConfig,
    _dicom_header,
    generate_hospital,
    write_completion_marker,
)

NOW = datetime(2026, 3, 1)
KEY = b"u" * 32
CONFIG = SyntheticConfig(n_patients=30, n_batches=1, days_per_batch=3, seed=11, imaging=True)


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imaging_hospital")
    generate_hospital(root / "landing", CONFIG)
    return root / "landing"


def _zones(root: Path) -> ZonePaths:
    return ZonePaths(
        landing=root / "landing", archive=root / "archive", quarantine=root / "quarantine", phi=root / "phi"
    )


def _copy(hospital: Path, root: Path) -> tuple[ZonePaths, Path]:
    shutil.copytree(hospital, root / "landing")
    (batch,) = sorted(p for p in (root / "landing").iterdir() if p.is_dir())
    return _zones(root), batch


def _with_patients(hospital: Path, root: Path) -> tuple[ZonePaths, Path]:
    zones, batch = _copy(hospital, root)
    process_file(zones=zones, batch_id=batch.name, source="patients", now=NOW)
    return zones, batch


def _dicom_files(batch: Path) -> list[Path]:
    return sorted((batch / IMAGING_FOLDER).glob(f"*{DICOM_SUFFIX}"))


# --- the marker -------------------------------------------------------------------------------------------


def test_the_marker_lists_imaging_files_by_path_and_they_count_in_the_content_hash(hospital, tmp_path):
    _, batch = _copy(hospital, tmp_path)
    before = inspect_batch(batch)
    assert isinstance(before, LandingBatch) and before.problems == ()
    listed = [n for n in before.files if n.startswith(f"{IMAGING_FOLDER}/")]
    assert len(listed) == len(_dicom_files(batch)) > 10
    first = _dicom_files(batch)[0]
    ds = pydicom.dcmread(first)
    ds.Modality = "CT" if ds.Modality != "CT" else "MR"
    write_dicom(ds, first)
    write_completion_marker(batch)
    after = inspect_batch(batch)
    assert isinstance(after, LandingBatch) and after.content_hash != before.content_hash


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("imaging/0000001.dcm", True),
        ("labs.csv", True),
        ("imaging/../labs.csv", False),
        ("imaging/sub/x.dcm", False),
        ("scans/x.dcm", False),
        ("/imaging/x.dcm", False),
        ("imaging/", False),
    ],
)
def test_a_marker_may_name_files_one_level_down_in_imaging_only(name, ok):
    assert listed_name_ok(name) is ok


def test_an_imaging_file_the_marker_does_not_list_is_not_read(hospital, tmp_path):
    zones, batch = _with_patients(hospital, tmp_path)
    shutil.copy(_dicom_files(batch)[0], batch / IMAGING_FOLDER / "zz_late.dcm")  # after the marker
    b = inspect_batch(batch)
    assert isinstance(b, LandingBatch) and b.problems == ("unlisted_file",)
    outcome, _ = process_imaging(zones=zones, batch_id=batch.name, now=NOW)
    assert outcome.rows_in == len(_dicom_files(batch)) - 1


def test_a_listed_imaging_file_still_missing_keeps_the_batch_from_starting(hospital, tmp_path):
    _, batch = _copy(hospital, tmp_path)
    _dicom_files(batch)[3].unlink()
    assert inspect_batch(batch).reason == "listed_file_missing"  # type: ignore[union-attr]


def test_a_symlinked_imaging_folder_is_never_followed(hospital, tmp_path):
    zones, batch = _with_patients(hospital, tmp_path)
    outside = tmp_path / "elsewhere"
    shutil.move(batch / IMAGING_FOLDER, outside)
    (batch / IMAGING_FOLDER).symlink_to(outside, target_is_directory=True)
    b = inspect_batch(batch)
    assert isinstance(b, LandingBatch) and set(b.problems) == {"symlink"}
    outcome, index = process_imaging(zones=zones, batch_id=batch.name, now=NOW)
    assert index.height == 0 and outcome.rejected_by_reason == {"symlink": outcome.rows_in}


def test_a_batch_without_a_marker_reads_the_dicom_files_of_its_imaging_folder(hospital, tmp_path):
    _, batch = _copy(hospital, tmp_path)
    (batch / COMPLETION_MARKER).unlink()
    (batch / IMAGING_FOLDER / "readme.txt").write_text("not an image")
    first, fp = read_unmarked_batch(batch, previous_fingerprint=None, quiet_seconds=0)
    assert first is None
    b, _ = read_unmarked_batch(
        batch, previous_fingerprint=fp, quiet_seconds=0, now=datetime.now().timestamp() + 60
    )
    assert b is not None and "unlisted_file" in b.problems
    assert sum(n.startswith(f"{IMAGING_FOLDER}/") for n in b.files) == len(_dicom_files(batch))


def test_imaging_alone_without_a_marker_is_not_a_batch(hospital, tmp_path):
    _, batch = _copy(hospital, tmp_path)
    for p in batch.iterdir():
        if p.is_file():
            p.unlink()
    _, fp = read_unmarked_batch(batch, previous_fingerprint=None, quiet_seconds=0)
    b, _ = read_unmarked_batch(
        batch, previous_fingerprint=fp, quiet_seconds=0, now=datetime.now().timestamp() + 60
    )
    assert b is None


# --- ingestion --------------------------------------------------------------------------------------------


def test_a_clean_imaging_folder_is_accepted_archived_indexed_and_ledgered(hospital, tmp_path):
    zones, batch = _with_patients(hospital, tmp_path)
    outcome, index = process_imaging(zones=zones, batch_id=batch.name, now=NOW)
    n = len(_dicom_files(batch))
    assert (outcome.status, outcome.rows_in, outcome.rows_accepted, outcome.rows_rejected) == (
        "accepted",
        n,
        n,
        0,
    )
    assert index["row_number"].to_list() == list(range(1, n + 1))
    for row in index.iter_rows(named=True):
        assert (zones.archive / row["archived_as"]).is_file() and row["mrn"] and row["sop_instance_uid"]
    entry = json.loads((zones.archive / "ledger" / batch.name / "imaging.json").read_text())
    assert entry["rows_in"] == entry["rows_accepted"] + entry["rows_rejected"] == n
    assert batch.name not in json.dumps(entry["rejected_by_reason"])
    assert pl.read_parquet(accepted_path(zones, "imaging", batch.name)).height == n


def test_a_batch_without_imaging_is_not_delivered_and_leaves_no_entry(tmp_path):
    generate_hospital(tmp_path / "landing", SyntheticConfig(n_patients=20, n_batches=1, seed=2))
    zones = _zones(tmp_path)
    (batch,) = sorted(p for p in (tmp_path / "landing").iterdir() if p.is_dir())
    outcome, index = process_imaging(zones=zones, batch_id=batch.name, now=NOW)
    assert outcome.status == "not_delivered" and index.height == 0
    assert not (zones.archive / "ledger" / batch.name / "imaging.json").exists()


def _not_dicom(path: Path) -> None:
    path.write_bytes(b"%PDF-1.4 a scanned letter for the patient")


def _dataset(attr: str, value: object):
    def damage(path: Path) -> None:
        ds = pydicom.dcmread(path)
        if value is None:
            delattr(ds, attr)
        else:
            setattr(ds, attr, value)
        ds.save_as(path, enforce_file_format=True)  # the file meta as read: a PACS that lost the attribute

    return damage


def _same_instance_as_first(path: Path) -> None:
    first = sorted(path.parent.glob("*.dcm"))[0]
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = pydicom.dcmread(first).SOPInstanceUID
    write_dicom(ds, path)


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:100])


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_not_dicom, "not_dicom"),
        (_cut, "not_dicom"),
        (_dataset("PatientID", None), "missing_patient_id"),
        (_dataset("PatientID", "STRANGER99"), "unknown_patient"),
        (_dataset("SOPInstanceUID", None), "missing_sop_instance_uid"),
        (_dataset("StudyDate", "20990101"), "future_date:StudyDate"),
        (_same_instance_as_first, "duplicate_instance"),
    ],
)
def test_one_bad_file_is_quarantined_with_its_reason_and_the_others_are_accepted(
    hospital, tmp_path, damage, reason
):
    zones, batch = _with_patients(hospital, tmp_path)
    files = _dicom_files(batch)
    victim = files[len(files) // 2]
    mrn = str(pydicom.dcmread(victim).PatientID)
    damage(victim)
    write_completion_marker(batch)  # a delivery whose marker is right about a bad file
    outcome, index = process_imaging(zones=zones, batch_id=batch.name, now=NOW)
    assert outcome.rows_in == len(files) == outcome.rows_accepted + outcome.rows_rejected
    assert outcome.rejected_by_reason == {reason: 1}
    assert victim.relative_to(batch).as_posix() not in index["file"].to_list()
    quarantined = zones.quarantine / batch.name / IMAGING_FOLDER
    assert (quarantined / victim.name).read_bytes() == victim.read_bytes()  # nothing lost
    why = json.loads((quarantined / f"{victim.name}.reason.json").read_text())
    assert why["reason_code"] == reason and why["detail"] and reason in FILE_REASONS
    assert mrn not in json.dumps(why) and mrn not in json.dumps(outcome.ledger_row())
    rejects = pl.read_parquet(zones.phi / outcome.rejects_path)
    assert rejects.rows() == [(files.index(victim) + 1, reason)]


def test_a_file_whose_digest_differs_from_the_marker_is_rejected(hospital, tmp_path):
    zones, batch = _with_patients(hospital, tmp_path)
    marker = json.loads((batch / COMPLETION_MARKER).read_text())
    name = f"{IMAGING_FOLDER}/{_dicom_files(batch)[0].name}"
    marker["files"][name]["sha256"] = "0" * 64
    (batch / COMPLETION_MARKER).write_text(json.dumps(marker))
    outcome, _ = process_imaging(zones=zones, batch_id=batch.name, now=NOW)
    assert outcome.rejected_by_reason == {"checksum_mismatch": 1}


def test_without_accepted_patients_the_cross_file_check_is_skipped_and_said(hospital, tmp_path):
    zones, batch = _copy(hospital, tmp_path)  # patients never ingested
    outcome, _ = process_imaging(zones=zones, batch_id=batch.name, now=NOW)
    assert outcome.rows_rejected == 0 and outcome.warnings["cross_file_checks_skipped"] == outcome.rows_in


def test_a_file_accepted_in_an_earlier_batch_is_a_duplicate_delivery_not_quarantined(hospital, tmp_path):
    zones, batch = _with_patients(hospital, tmp_path)
    process_imaging(zones=zones, batch_id=batch.name, now=NOW)
    later = batch.with_name("2026-02-01")
    shutil.copytree(batch, later)
    process_file(zones=zones, batch_id=later.name, source="patients", now=NOW)
    outcome, index = process_imaging(zones=zones, batch_id=later.name, now=NOW)
    assert index.height == 0 and outcome.rejected_by_reason == {"duplicate_delivery": outcome.rows_in}
    assert not (zones.quarantine / later.name).exists()


def test_the_row_account_lists_imaging_files_when_delivered(hospital, tmp_path):
    zones, batch = _with_patients(hospital, tmp_path)
    _not_dicom(_dicom_files(batch)[0])
    write_completion_marker(batch)
    outcome, _ = process_imaging(zones=zones, batch_id=batch.name, now=NOW)
    (imaging,) = [
        s for s in batch_account(zones, tmp_path / "deid", batch.name).sources if s.source == "imaging"
    ]
    assert imaging.words() == (
        f"imaging {outcome.rows_in:,} delivered, {outcome.rows_accepted:,} accepted, 1 rejected (1 not_dicom)"
    )


# --- the boundary -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ingested(hospital: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ZonePaths, str]:
    root = tmp_path_factory.mktemp("imaging_ingested")
    zones, batch = _copy(hospital, root)
    process_batch(zones=zones, batch_id=batch.name, now=NOW)
    process_imaging(zones=zones, batch_id=batch.name, now=NOW)
    return zones, batch.name


def _raw(zones: ZonePaths, batch_id: str) -> dict[str, pl.DataFrame]:
    return {
        s: pl.read_parquet(p) if (p := accepted_path(zones, s, batch_id)).is_file() else empty_accepted(s)
        for s in SOURCES
    }


def _release(zones: ZonePaths, batch_id: str, *, k: int = 1, opted_out: list[str] = (), imaging=None,  # type: ignore[assignment]
             stage: Path | None = None):  # fmt: skip
    return release_batch(
        _raw(zones, batch_id),
        vault=Vault.empty(),
        batch_id=batch_id,
        policy=RiskPolicy(k=k),
        max_shift_weeks=52,
        rng=np.random.default_rng(5),
        hmac_key=None,
        opted_out=pl.Series("mrn", list(opted_out), dtype=pl.String),
        imaging=accepted_instances(zones, batch_id) if imaging is None else imaging,
        imaging_key=KEY,
        imaging_stage=stage or staging_folder(zones.phi.parent / "deid" / "imaging" / batch_id),
    )


def _staged(rel) -> list[Dataset]:  # type: ignore[no-untyped-def]
    """The de-identified files a release staged."""
    assert rel.imaging is not None and rel.imaging.staged is not None
    return [pydicom.dcmread(p) for p in sorted(rel.imaging.staged.rglob(f"*{DICOM_SUFFIX}"))]


def _edited(inst: ImagingInstance, folder: Path, edit: Callable[[Dataset], None]) -> ImagingInstance:
    """``inst`` as another file: its archived file, changed by ``edit``, written into ``folder``."""
    ds = pydicom.dcmread(inst.path)
    edit(ds)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{inst.name}{DICOM_SUFFIX}"
    ds.save_as(path)
    return dataclasses.replace(inst, path=path)


def _image(inst: ImagingInstance) -> bool:
    return str(read_header(inst.path).Modality) != "SR"


def test_studies_become_events_shifted_like_the_patients_other_events(ingested):
    zones, batch_id = ingested
    rel = _release(zones, batch_id)
    assert rel.released, rel.leaks
    vault = rel.deid.vault.patients
    raw_enc = _raw(zones, batch_id)["encounters"]
    deid_enc = rel.frames["encounters"]
    index = pl.read_parquet(accepted_path(zones, "imaging", batch_id))
    instances = {i.name: i for i in accepted_instances(zones, batch_id)}
    checked = 0
    for row in index.iter_rows(named=True):
        ds = read_header(instances[str(row["row_number"])].path)
        if ds.Modality == "SR" or "StudyTime" not in ds or "AdmissionID" not in ds:
            continue
        subject, shift = vault.filter(pl.col("mrn") == row["mrn"]).select("subject_id", "shift_days").row(0)
        study = datetime.strptime(ds.StudyDate + ds.StudyTime, "%Y%m%d%H%M%S")
        # the stay's admission moved by the same number of days as the study
        admit = raw_enc.filter(pl.col("encounter_id") == ds.AdmissionID)["admit_time"][0]
        moved = deid_enc.filter(pl.col("subject_id") == subject)["admit_time"].to_list()
        assert admit + timedelta(days=shift) in moved
        ev = rel.frames["events"].filter(
            (pl.col("subject_id") == subject)
            & pl.col("code").str.starts_with("IMAGING//")
            & (pl.col("time") == study + timedelta(days=shift))
        )
        assert ev.height >= 1
        checked += 1
    assert checked > 5
    codes = set(rel.frames["events"]["code"].to_list())
    assert {c for c in codes if c.startswith("IMAGING")} >= {"IMAGING//DX//CHEST", "IMAGING//CT//HEAD"}


def test_a_study_known_by_its_date_alone_is_available_from_the_end_of_that_day(ingested, tmp_path):
    zones, batch_id = ingested
    (inst,) = [i for i in accepted_instances(zones, batch_id) if _image(i)][:1]
    inst = _edited(inst, tmp_path, lambda ds: delattr(ds, "StudyTime"))
    rel = _release(zones, batch_id, imaging=[inst])
    ev = rel.frames["events"].filter(pl.col("code").str.starts_with("IMAGING//"))
    assert ev.height == 1
    time, available = ev.select("time", "available_time").row(0)
    assert (time.hour, time.minute) == (0, 0) and available == time + timedelta(days=1, seconds=-1)


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        ({"BurnedInAnnotation": "YES"}, "burned_in_annotation"),
        ({"Modality": "US"}, "burned_in_annotation_unknown"),  # ultrasound without the flag
        ({"BurnedInAnnotation": "NO"}, None),
    ],
)
def test_burned_in_pixels_are_withheld_counted_and_the_header_released(ingested, flags, reason, tmp_path):
    zones, batch_id = ingested

    def edit(ds: Dataset) -> None:
        for k in ("BurnedInAnnotation", "PixelData"):
            if k in ds:
                delattr(ds, k)
        for k, v in flags.items():
            setattr(ds, k, v)
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 2, 2, 8, 8, 7
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
        ds.add_new(0x7FE00010, "OB", bytes(4))

    inst = _edited(next(i for i in accepted_instances(zones, batch_id) if _image(i)), tmp_path, edit)
    rel = _release(zones, batch_id, imaging=[inst])
    assert rel.released and rel.imaging is not None
    (out,) = _staged(rel)
    assert ("PixelData" in out) is (reason is None)
    withheld = {k: v for k, v in rel.imaging.counts.items() if k.startswith("pixels_dropped:")}
    assert withheld == ({f"pixels_dropped:{reason}": 1} if reason else {})


def test_an_objecting_patient_has_no_dicom_file_and_no_imaging_event_released(ingested):
    zones, batch_id = ingested
    index = pl.read_parquet(accepted_path(zones, "imaging", batch_id))
    mrn = index["mrn"][0]
    rel = _release(zones, batch_id, opted_out=[mrn])
    subject = rel.deid.vault.patients.filter(pl.col("mrn") == mrn)["subject_id"][0]
    assert rel.imaging is not None
    assert str(subject) not in {str(ds.PatientID) for ds in _staged(rel)}
    assert not (rel.imaging.staged / str(subject)).exists()  # never written, not even staged
    assert rel.frames["events"].filter(pl.col("subject_id") == subject).height == 0
    assert rel.imaging.counts["not_released:withheld"] == int((index["mrn"] == mrn).sum())


def test_an_identifier_in_a_kept_attribute_stops_the_release_and_nothing_stays_staged(ingested, tmp_path):
    zones, batch_id = ingested
    instances = accepted_instances(zones, batch_id)
    mrn = str(read_header(instances[-1].path).PatientID)

    def edit(ds: Dataset) -> None:
        finding, concept = Dataset(), Dataset()
        finding.ValueType = "CODE"
        concept.CodeValue, concept.CodingSchemeDesignator = mrn, "99LOCAL"  # a code that is an MRN
        finding.ConceptCodeSequence = [concept]
        ds.ContentSequence = [finding]

    stage = tmp_path / ".stage"
    rel = _release(
        zones, batch_id, imaging=[*instances[:-1], _edited(instances[-1], tmp_path, edit)], stage=stage
    )
    assert not rel.released
    assert any("CodeValue holds a raw identifier value" in p for p in rel.leaks["events"])
    assert mrn not in " ".join(rel.leaks["events"])
    assert rel.imaging is not None and rel.imaging.staged is None and not stage.exists()


def test_released_files_are_written_per_pseudonym_replaced_on_rerun_and_withdrawn(ingested, tmp_path):
    zones, batch_id = ingested
    folder = tmp_path / "deid" / "imaging" / batch_id
    rel = _release(zones, batch_id, stage=staging_folder(folder))
    assert rel.imaging is not None
    n = publish_imaging(rel.imaging, folder, released=True)
    files = sorted(folder.rglob("*.dcm"))
    assert n == len(files) == len(rel.imaging.files) > 0
    assert not staging_folder(folder).exists()
    for path in files[:10]:
        ds = pydicom.dcmread(path)
        assert path.parent.name == ds.PatientID and ds.SOPInstanceUID.startswith(UID_ROOT)
    rel = _release(zones, batch_id, stage=staging_folder(folder))
    assert publish_imaging(rel.imaging, folder, released=True) == n  # a rerun replaces, never doubles
    assert len(list(folder.rglob("*.dcm"))) == n
    subject = files[0].parent.name
    mine = len(list((folder / subject).glob("*.dcm")))
    assert withdraw_imaging(folder.parent, pl.Series([int(subject)])) == mine
    assert not (folder / subject).exists() and len(list(folder.rglob("*.dcm"))) == n - mine
    rel = _release(zones, batch_id, stage=staging_folder(folder))
    assert publish_imaging(rel.imaging, folder, released=False) == 0 and not folder.exists()
    assert not staging_folder(folder).exists()  # a batch not released leaves nothing staged
    (staging_folder(folder) / "1").mkdir(parents=True)  # what a run killed while staging left
    (staging_folder(folder) / "1" / "x.dcm").write_bytes(b"")
    assert publish_imaging(None, folder, released=True) == 0 and not staging_folder(folder).exists()


def test_released_files_are_byte_for_byte_those_of_the_whole_batch_held_in_memory(ingested, tmp_path):
    """The streamed release writes exactly what de-identifying every file in memory and writing it wrote
    (the release before it streamed), pixel data included."""
    zones, batch_id = ingested

    def pixels(ds: Dataset) -> None:
        ds.BurnedInAnnotation = "NO"
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 32, 16, 16, 15
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
        ds.add_new(0x7FE00010, "OW", bytes(range(256)) * 4)

    instances = accepted_instances(zones, batch_id)
    images = [i.name for i in instances if _image(i)][:3]
    instances = [_edited(i, tmp_path / "edited", pixels) if i.name in images else i for i in instances]
    folder = tmp_path / "deid" / "imaging" / batch_id
    rel = _release(zones, batch_id, imaging=instances, k=2, stage=staging_folder(folder))
    assert rel.released and rel.imaging is not None
    n = publish_imaging(rel.imaging, folder, released=True)
    vault = rel.deid.vault.patients
    kept = {str(s) for s in rel.frames["patients"]["subject_id"].to_list()}
    expected: dict[str, bytes] = {}
    for inst in instances:
        subject, shift = vault.filter(pl.col("mrn") == inst.mrn).select("subject_id", "shift_days").row(0)
        if str(subject) not in kept:
            continue
        out, _ = deidentify(pydicom.dcmread(inst.path), pseudonym=str(subject), shift_days=shift, key=KEY)
        write_dicom(out, tmp_path / "memory" / "x.dcm")
        expected[f"{subject}/{out.SOPInstanceUID}{DICOM_SUFFIX}"] = (
            tmp_path / "memory" / "x.dcm"
        ).read_bytes()
    got = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob(f"*{DICOM_SUFFIX}")}
    assert n == len(got) == len(expected) and got == expected
    assert sum(b"\x00\x01\x02\x03" in b for b in got.values()) >= 1  # pixel data released as well


def test_the_synthetic_pacs_export_carries_identifiers_and_the_gaps_of_a_real_one(tmp_path):
    generate_hospital(
        tmp_path, SyntheticConfig(n_patients=150, n_batches=1, days_per_batch=3, seed=4, imaging=True)
    )
    (batch,) = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    listed = json.loads((batch / COMPLETION_MARKER).read_text())["files"]
    files = _dicom_files(batch)
    assert {f"{IMAGING_FOLDER}/{p.name}" for p in files} <= set(listed)
    headers = [pydicom.dcmread(p) for p in files]
    images = [ds for ds in headers if ds.Modality != "SR"]
    for ds in headers:  # what a real header carries about the person
        assert ds.PatientName and ds.PatientID and ds.PatientBirthDate and ds.AccessionNumber
        assert ds.InstitutionName and ds.StudyInstanceUID and ds.StudyDate
    gaps = {
        "no admission number": sum("AdmissionID" not in ds for ds in images),
        "no body part": sum("BodyPartExamined" not in ds for ds in images),
        "no study time": sum("StudyTime" not in ds for ds in images),
        "burned-in annotation": sum(ds.get("BurnedInAnnotation") == "YES" for ds in images),
        "structured report": len(headers) - len(images),
    }
    assert all(gaps.values()), gaps
    assert gaps["no admission number"] < len(images) / 2  # gaps, not the rule
    # an ultrasound drawn without the flag has none (rarer: checked on the header itself)
    study = {**studies_row(images[0]), "modality": "US", "burned_in": False, "with_burn_in_flag": False}
    assert "BurnedInAnnotation" not in _dicom_header(study, seed=4, number=1, report=False)


def studies_row(ds: pydicom.Dataset) -> dict:
    """A generator study row that would give a header like ``ds``."""
    return {
        "modality": ds.Modality,
        "body_part": "CHEST",
        "with_admission_id": True,
        "encounter_id": "ENC-1",
        "mrn": str(ds.PatientID),
        "first_name": "A",
        "last_name": "B",
        "birth_date": datetime.strptime(ds.PatientBirthDate, "%Y%m%d").date(),
        "sex": "F",
        "site": "SITE_A",
        "study_time": datetime(2026, 1, 5, 10),
        "burned_in": False,
        "finding": "",
    }
