"""DICOM de-identification (PS3.15 basic profile: every attribute of the table handled), UIDs, dates,
private attributes, burned-in annotations, and imaging events."""

import tracemalloc
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pydicom
import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ImplicitVRLittleEndian

from clinical_ml.core.dicom import (
    BASIC_PROFILE,
    IMAGING_FOLDER,
    ImagingInstance,
    deidentify,
    dicom_leaks,
    keep_subjects,
    new_uid,
    read_header,
    read_imaging,
    release_imaging,
    stage_imaging,
    uid_key,
    write_dicom,
    write_released,
)

KEY = b"k" * 32
CANARY = "Zorblatt"  # in every value a person could be identified by


def _value(keyword: str, i: int):
    vr = dictionary_VR(keyword)
    if vr == "SQ":
        item = Dataset()
        item.PersonName = f"{CANARY}^Seq{i}"
        item.CodeMeaning = f"{CANARY} meaning {i}"
        return [item]
    if vr == "DA":
        return "19500101"
    if vr == "TM":
        return "101010"
    if vr == "DS":
        return "71.5"
    if vr in ("US", "SS", "UL"):
        return 4
    if vr == "AS":
        return "045Y"
    if vr == "CS":
        return "F"
    if vr == "PN":
        return f"{CANARY}^Person{i}"
    return f"{CANARY}{i}"


def _study(**extra) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.99.1.1.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.99.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.99.1.1"
    ds.PatientID = "MRN00042"
    ds.AdmissionID = "ENC-0042"
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.StudyDate = "20250310"
    ds.StudyTime = "143015"
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


def _full() -> Dataset:
    ds = _study()
    for i, keyword in enumerate(BASIC_PROFILE):
        if keyword not in ("PatientID", "AdmissionID"):
            setattr(ds, keyword, _value(keyword, i))
    return ds


@pytest.mark.parametrize("keyword", sorted(BASIC_PROFILE))
def test_every_attribute_of_the_profile_table_gets_its_action(keyword):
    out, log = deidentify(_full(), pseudonym="777", shift_days=-14, key=KEY)
    action = BASIC_PROFILE[keyword]
    if action == "X":
        assert keyword not in out
    elif action == "Z":
        assert str(out[keyword].value) == ("777" if keyword in ("PatientID", "PatientName") else "")
    else:  # D: a dummy, nothing of the original
        assert keyword in out and CANARY not in str(out[keyword].value) and str(out[keyword].value)
    assert log.actions[f"{action}:{keyword}"] == 1


def test_no_value_of_the_original_survives_in_the_written_file(tmp_path):
    out, _ = deidentify(_full(), pseudonym="777", shift_days=-14, key=KEY)
    (path,) = write_released({"x.dcm": out}, tmp_path)
    data = path.read_bytes()
    for needle in (CANARY, "MRN00042", "ENC-0042", "1.2.826.0.1.3680043.99", "19500101", "20250310"):
        assert needle.encode() not in data
    back = pydicom.dcmread(path)
    assert back.PatientIdentityRemoved == "YES" and back.StudyDate == "20250224"


def test_the_numbers_that_say_what_the_pixels_mean_are_kept(tmp_path):
    """A CT's Hounsfield scale, display window and slice geometry are numbers of the scanner, not of the
    person: without them the released pixel values cannot be read as what they measure."""
    geometry = {
        "RescaleIntercept": "-1024",
        "RescaleSlope": "1",
        "WindowCenter": "40",
        "WindowWidth": "400",
        "ImagePositionPatient": ["-175.5", "-180.0", "-312.25"],
        "ImageOrientationPatient": ["1", "0", "0", "0", "1", "0"],
        "SliceLocation": "-312.25",
        "SpacingBetweenSlices": "2.5",
    }
    out, _ = deidentify(_study(**geometry), pseudonym="1", shift_days=7, key=KEY)
    (path,) = write_released({"ct.dcm": out}, tmp_path)
    back = pydicom.dcmread(path)
    for keyword, value in geometry.items():
        got = back[keyword].value
        assert [float(v) for v in (got if isinstance(value, list) else [got])] == [
            float(v) for v in (value if isinstance(value, list) else [value])
        ], keyword
    assert dicom_leaks({"ct.dcm": out}, {"MRN00042", "ENC-0042"}, set()) == []  # the release gate passes it


def test_uids_are_replaced_consistently_and_standard_uids_kept():
    a, log = deidentify(_study(), pseudonym="1", shift_days=7, key=KEY)
    b, _ = deidentify(
        _study(SOPInstanceUID="1.2.826.0.1.3680043.99.1.1.2"), pseudonym="1", shift_days=7, key=KEY
    )
    other_key, _ = deidentify(_study(), pseudonym="1", shift_days=7, key=b"o" * 32)
    assert a.StudyInstanceUID == b.StudyInstanceUID == new_uid("1.2.826.0.1.3680043.99.1", key=KEY)
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert a.StudyInstanceUID.startswith("2.25.") and len(a.StudyInstanceUID) <= 64
    assert other_key.StudyInstanceUID != a.StudyInstanceUID
    assert a.SOPClassUID == CTImageStorage  # a registered DICOM UID names a kind of object, not a person
    assert log.actions["U"] == 3


@pytest.mark.parametrize("shift", [-21, 0, 35])
def test_dates_move_by_the_patients_shift_and_times_stay(shift):
    ds = _study(SeriesDate="20250310", AcquisitionDateTime="20250310143015.123")
    out, _ = deidentify(ds, pseudonym="1", shift_days=shift, key=KEY)
    expect = (datetime(2025, 3, 10) + timedelta(days=shift)).strftime("%Y%m%d")
    assert out.StudyDate == out.SeriesDate == expect
    assert out.AcquisitionDateTime == expect + "143015.123"
    assert out.StudyTime == "143015"
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"


def test_private_attributes_are_removed_also_inside_sequences():
    ds = _study()
    block = ds.private_block(0x0011, "ACME HOSPITAL", create=True)
    block.add_new(0x01, "LO", CANARY)
    item = Dataset()
    item.CodeValue = "233604007"
    item.add_new(0x00290010, "LO", "ACME")
    item.add_new(0x00291001, "LO", CANARY)
    ds.ContentSequence = [Dataset()]
    ds.ContentSequence[0].ValueType = "CODE"
    ds.ContentSequence[0].ConceptCodeSequence = [item]
    out, log = deidentify(ds, pseudonym="1", shift_days=7, key=KEY)
    found = []
    out.walk(lambda _d, e: found.append(e.tag) if e.tag.is_private else None)
    assert found == [] and log.actions["X:private"] == 4
    assert out.ContentSequence[0].ConceptCodeSequence[0].CodeValue == "233604007"


def test_an_attribute_the_table_does_not_name_is_removed_by_the_allowlist():
    ds = _study(PatientSpeciesDescription=CANARY, ClinicalTrialSponsorName=CANARY)
    out, log = deidentify(ds, pseudonym="1", shift_days=7, key=KEY)
    assert "PatientSpeciesDescription" not in out and "ClinicalTrialSponsorName" not in out
    assert log.actions["removed_not_allowlisted"] >= 2


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        ({"BurnedInAnnotation": "YES"}, "burned_in_annotation"),
        ({"BurnedInAnnotation": "NO", "RecognizableVisualFeatures": "YES"}, "recognizable_visual_features"),
        ({"Modality": "US"}, "burned_in_annotation_unknown"),
        ({"BurnedInAnnotation": "NO"}, None),
        ({}, None),  # CT without a flag: CT does not burn text into its pixels
    ],
)
def test_burned_in_annotation_drops_the_pixels_with_a_reason(attrs, reason):
    ds = _study(**attrs)
    ds.Rows, ds.Columns, ds.BitsAllocated = 2, 2, 8
    ds.PixelData = b"\x01\x02\x03\x04"
    out, log = deidentify(ds, pseudonym="1", shift_days=7, key=KEY)
    assert ("PixelData" in out) is (reason is None)
    assert dict(log.pixels_dropped) == ({reason: 1} if reason else {})


def _mapping():
    patients = pl.DataFrame({"mrn": ["MRN00042"], "subject_id": [555], "shift_days": [-7]})
    encounters = pl.DataFrame({"encounter_id": ["ENC-0042", "ENC-0043"], "hadm_id": [9001, 9002]})
    raw = pl.DataFrame(
        {
            "encounter_id": ["ENC-0042", "ENC-0043"],
            "mrn": ["MRN00042", "MRN00042"],
            "admit_time": [datetime(2025, 3, 9), datetime(2025, 4, 1)],
            "discharge_time": [datetime(2025, 3, 15), datetime(2025, 4, 9)],
        }
    )
    return patients, encounters, raw


def _write(folder: Path, name: str, ds: Dataset) -> None:
    write_dicom(ds, folder / name)


def test_release_turns_studies_and_coded_findings_into_events(tmp_path):
    report = _study(
        SOPInstanceUID="1.2.826.0.1.3680043.99.1.9",
        Modality="SR",
        ContentDate="20250311",
        ContentTime="090000",
    )
    finding = Dataset()
    finding.ValueType = "CODE"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "233604007", "SCT", "pneumonia"
    finding.ConceptCodeSequence = [code]
    unknown = Dataset()
    unknown.ValueType = "CODE"
    other = Dataset()
    other.CodeValue, other.CodingSchemeDesignator = "999999", "SCT"
    unknown.ConceptCodeSequence = [other]
    report.ContentSequence = [finding, unknown]
    no_adm = _study(
        StudyInstanceUID="1.2.826.0.1.3680043.99.2",
        SOPInstanceUID="1.2.826.0.1.3680043.99.2.1.1",
        StudyDate="20250403",
        BodyPartExamined="FOOT",
    )
    del no_adm.AdmissionID
    stranger = _study(PatientID="MRN99999", SOPInstanceUID="1.2.826.0.1.3680043.99.3")
    folder = tmp_path / IMAGING_FOLDER
    for name, ds in {"a.dcm": _study(), "b.dcm": report, "c.dcm": no_adm, "d.dcm": stranger}.items():
        _write(folder, name, ds)
    (folder / "notes.txt").write_text(CANARY)
    instances, not_read = read_imaging(tmp_path)
    assert len(instances) == 4 and not_read == {"not_dicom": 1}
    patients, encounters, raw = _mapping()
    rel = release_imaging(instances, patients=patients, encounters=encounters, raw_encounters=raw, key=KEY)
    ev = rel.events.sort("time")
    assert ev["code"].to_list() == [
        "IMAGING//CT//CHEST",
        "IMAGING_FINDING//SCT:233604007",
        "IMAGING//CT//unmapped",
    ]
    assert ev["subject_id"].to_list() == [555] * 3
    assert ev["hadm_id"].to_list() == [9001, 9001, 9002]  # the last by its study time
    assert ev["time"][0] == datetime(2025, 3, 10, 14, 30, 15) - timedelta(days=7)
    assert rel.counts["not_released:no_patient"] == 1
    assert rel.counts["finding_not_in_vocabulary"] == 1
    assert rel.counts["stay:by_study_time"] == 1 and rel.counts["instances_released"] == 3
    assert len(rel.files) == 3 and all(n.startswith("2.25.") for n in rel.files)
    assert {f.subject_id for f in rel.files.values()} == {"555"}


def _image_file(folder: Path, number: int, *, pixel_bytes: int, **extra) -> ImagingInstance:
    ds = _study(SOPInstanceUID=f"1.2.826.0.1.3680043.99.1.1.{number}", **extra)
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = pixel_bytes // 1024, 512, 16, 16, 15
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.add_new(0x7FE00010, "OW", bytes(range(256)) * (pixel_bytes // 256))
    write_dicom(ds, folder / f"{number}.dcm")
    return ImagingInstance(str(number), folder / f"{number}.dcm", "MRN00042", "ENC-0042")


@pytest.mark.parametrize("implicit_vr", [False, True])  # PACS exports are often implicit VR little endian
def test_a_header_is_read_without_its_pixel_data_and_decides_as_the_whole_file(tmp_path, implicit_vr):
    inst = _image_file(tmp_path, 1, pixel_bytes=4096, BurnedInAnnotation="YES")
    if implicit_vr:
        ds = pydicom.dcmread(inst.path)
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(inst.path, enforce_file_format=True)
    header = read_header(inst.path)
    assert header.PixelData == b"" and header.Modality == "CT"
    whole, whole_log = deidentify(pydicom.dcmread(inst.path), pseudonym="1", shift_days=7, key=KEY)
    head, head_log = deidentify(header, pseudonym="1", shift_days=7, key=KEY)
    assert head_log == whole_log and dict(head_log.pixels_dropped) == {"burned_in_annotation": 1}
    assert head.SOPInstanceUID == whole.SOPInstanceUID and head.StudyInstanceUID == whole.StudyInstanceUID


def test_staging_writes_each_file_once_and_withheld_patients_never(tmp_path):
    patients, encounters, raw = _mapping()
    patients = pl.concat(
        [patients, pl.DataFrame({"mrn": ["MRN00043"], "subject_id": [556], "shift_days": [0]})]
    )
    instances = [_image_file(tmp_path / "in", n, pixel_bytes=1024) for n in (1, 2)]
    other = _image_file(tmp_path / "in", 3, pixel_bytes=1024, PatientID="MRN00043")
    instances.append(ImagingInstance("3", other.path, "MRN00043", None))
    rel = release_imaging(instances, patients=patients, encounters=encounters, raw_encounters=raw, key=KEY)
    kept = keep_subjects(rel, [555])
    assert kept.counts["not_released:withheld"] == 1 and kept.counts["instances_released"] == 2
    staged, leaks = stage_imaging(
        kept, tmp_path / "stage", key=KEY, raw_identifiers={"MRN00043"}, raw_numeric_ids=set()
    )
    assert leaks == [] and staged.staged == tmp_path / "stage"
    written = sorted(p.relative_to(tmp_path / "stage").as_posix() for p in (tmp_path / "stage").rglob("*"))
    assert written == ["555", *sorted(f"555/{n}" for n in kept.files)]  # no temporary file left
    with pytest.raises(ValueError, match="before stage_imaging"):
        keep_subjects(staged, [555])
    # an identifier found: nothing stays staged, and every file is still looked through
    staged, leaks = stage_imaging(
        kept, tmp_path / "stage", key=KEY, raw_identifiers={"555"}, raw_numeric_ids=set()
    )
    assert staged.staged is None and not (tmp_path / "stage").exists()
    assert leaks == ["imaging: 2 x PatientID holds a raw identifier value"]


def _peak_bytes(folder: Path, n_files: int, pixel_bytes: int) -> int:
    patients, encounters, raw = _mapping()
    instances = [_image_file(folder / "in", n, pixel_bytes=pixel_bytes) for n in range(n_files)]
    tracemalloc.start()
    try:
        rel = release_imaging(
            instances, patients=patients, encounters=encounters, raw_encounters=raw, key=KEY
        )
        stage_imaging(
            keep_subjects(rel, [555]), folder / "stage", key=KEY, raw_identifiers=set(), raw_numeric_ids=set()
        )
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_of_a_release_holds_one_file_not_the_batch(tmp_path):
    size = 256 * 1024
    few, many = _peak_bytes(tmp_path / "few", 2, size), _peak_bytes(tmp_path / "many", 16, size)
    assert len(list((tmp_path / "many" / "stage").rglob("*.dcm"))) == 16
    # 14 more files add less than one file's pixel data to the peak (holding them would add 14 x 256 KiB)
    assert many - few < size, (few, many)


def test_the_uid_key_of_the_vault_mode_is_made_once_and_kept_in_the_phi_zone(tmp_path):
    first = uid_key(phi_dir=tmp_path)
    assert uid_key(phi_dir=tmp_path) == first and len(first) == 32
    assert (tmp_path / "imaging_uid_key").stat().st_mode & 0o077 == 0
    assert uid_key(phi_dir=tmp_path, hmac_secret=KEY) == KEY


def test_a_uid_key_creation_killed_before_it_wrote_is_made_again_and_a_short_key_refused(tmp_path):
    (tmp_path / "imaging_uid_key").write_bytes(b"")  # what a kill between create and write left before
    made = uid_key(phi_dir=tmp_path)
    assert len(made) == 32 and uid_key(phi_dir=tmp_path) == made
    assert [p.name for p in tmp_path.iterdir()] == ["imaging_uid_key"]  # no temporary file left behind
    (tmp_path / "imaging_uid_key").write_bytes(b"short")
    with pytest.raises(ValueError, match="shorter than 32 bytes"):
        uid_key(phi_dir=tmp_path)


def test_runs_creating_the_uid_key_at_once_all_get_the_one_key(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: uid_key(phi_dir=tmp_path), range(32)))
    assert keys == {(tmp_path / "imaging_uid_key").read_bytes()}
