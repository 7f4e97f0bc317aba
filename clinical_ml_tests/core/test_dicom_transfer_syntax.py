"""A released DICOM file carries the transfer syntax its pixel data are in (PS3.5 section 10, Annex A).

Each delivered file goes through the release as the pipeline runs it (headers decide, then
:func:`stage_imaging` writes each whole file) and the released file is read back: either its pixel data are
the source's bytes under a transfer syntax that says how they are encoded (encapsulated frames stay
encapsulated, under their codec's syntax; big endian stays big endian), or they are withheld with a reason
the counts name and the de-identified header leaves alone. No codec is needed: the encapsulated frames are
arbitrary bytes, which is all a transfer syntax label has to be consistent with.
"""

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
)

from clinical_ml.core.dicom import (
    IMAGING_FOLDER,
    deidentify,
    dicom_leaks,
    keep_subjects,
    read_imaging,
    release_imaging,
    stage_imaging,
)
from clinical_ml.core.imaging import read_dicom

KEY = b"k" * 32
MRN = "MRN00042"
SUBJECT = 555
# Not JPEG or RLE streams, only bytes in frames: what matters is that they come back as the same frames.
FRAMES = (b"\xff\xd8 frame one of a study \xff\xd9", b"\xff\xd8 the second frame, odd\xff\xd9")
NATIVE = np.arange(16, dtype="<u2").reshape(4, 4) * 4099  # 16-bit values whose two bytes differ
PRIVATE_SYNTAX = UID("1.2.826.0.1.3680043.99.77.1")  # a vendor's own syntax: nobody knows its encoding


@dataclass(frozen=True)
class Case:
    """A delivered file and what its release must be."""

    syntax: UID
    frames: int = 0  # encapsulated frames (0: native pixel data)
    burned_in: str = "NO"
    relabel: UID | None = None  # the file meta then names this syntax instead (a broken delivery)
    released: UID | None = None  # the released file's transfer syntax
    withheld: str | None = None  # the reason the pixel data do not leave, when they do not


CASES = {
    "implicit VR little endian": Case(ImplicitVRLittleEndian, released=ExplicitVRLittleEndian),
    "explicit VR little endian": Case(ExplicitVRLittleEndian, released=ExplicitVRLittleEndian),
    # big endian pixel data stay big endian: a little endian label would need every 16-bit value swapped
    "explicit VR big endian": Case(ExplicitVRBigEndian, released=ExplicitVRBigEndian),
    # deflate wraps the whole dataset, not the pixel data: released inflated, readable to a byte scan
    "deflated explicit VR little endian": Case(
        DeflatedExplicitVRLittleEndian, released=ExplicitVRLittleEndian
    ),
    "JPEG baseline, one frame": Case(JPEGBaseline8Bit, frames=1, released=JPEGBaseline8Bit),
    "RLE lossless, two frames": Case(RLELossless, frames=2, released=RLELossless),
    "JPEG burned in": Case(
        JPEGBaseline8Bit,
        frames=1,
        burned_in="YES",
        released=ExplicitVRLittleEndian,
        withheld="burned_in_annotation",
    ),
    "private syntax, encapsulated": Case(
        PRIVATE_SYNTAX, frames=1, released=ExplicitVRLittleEndian, withheld="unknown_transfer_syntax"
    ),
    "RLE label on native pixel data": Case(
        ExplicitVRLittleEndian,
        relabel=RLELossless,
        released=ExplicitVRLittleEndian,
        withheld="pixel_data_inconsistent_with_transfer_syntax",
    ),
    "native label on encapsulated pixel data": Case(
        RLELossless,
        frames=1,
        relabel=ExplicitVRLittleEndian,
        released=ExplicitVRLittleEndian,
        withheld="pixel_data_inconsistent_with_transfer_syntax",
    ),
}


def _source(case: Case, path: Path) -> bytes:
    """Write the delivered file of ``case``; returns its pixel data as they are in the file."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.99.1.1.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.99.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.99.1.1"
    ds.PatientID, ds.PatientName, ds.AdmissionID = MRN, "Zorblatt^Anna", "ENC-0042"
    ds.Modality, ds.StudyDate, ds.StudyTime = "CT", "20250310", "143015"
    ds.BurnedInAnnotation = case.burned_in
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 4, 4, 1, "MONOCHROME2"
    ds.PixelRepresentation = 0
    if case.frames:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.NumberOfFrames = case.frames
        ds.LossyImageCompression = "01" if case.syntax == JPEGBaseline8Bit else "00"
        pixels = encapsulate(list(FRAMES[: case.frames]))
        ds.add_new(0x7FE00010, "OB", pixels)
        ds["PixelData"].is_undefined_length = True
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        big = case.syntax == ExplicitVRBigEndian
        pixels = NATIVE.astype(">u2" if big else "<u2").tobytes()
        ds.add_new(0x7FE00010, "OW", pixels)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = case.syntax
    path.parent.mkdir(parents=True, exist_ok=True)
    if case.syntax.is_private:
        ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=True)
    else:
        ds.save_as(path, enforce_file_format=True)
    if case.relabel is not None:  # both UIDs are 19 characters and a pad: the file meta keeps its length
        data = path.read_bytes()
        old, new = f"{case.syntax}\0".encode(), f"{case.relabel}\0".encode()
        assert len(old) == len(new) and data.count(old) == 1
        path.write_bytes(data.replace(old, new))
    return pixels


def _mapping() -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    patients = pl.DataFrame({"mrn": [MRN], "subject_id": [SUBJECT], "shift_days": [-7]})
    encounters = pl.DataFrame({"encounter_id": ["ENC-0042"], "hadm_id": [9001]})
    raw = pl.DataFrame(
        {
            "encounter_id": ["ENC-0042"],
            "mrn": [MRN],
            "admit_time": [datetime(2025, 3, 9)],
            "discharge_time": [datetime(2025, 3, 15)],
        }
    )
    return patients, encounters, raw


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_a_released_file_carries_the_transfer_syntax_of_its_pixel_data(tmp_path, case):
    source = tmp_path / "batch" / IMAGING_FOLDER / "1.dcm"
    pixels = _source(case, source)
    read_dicom(source)  # ingestion accepts it: the release must make a valid file of it, or withhold
    instances, not_read = read_imaging(tmp_path / "batch")
    assert len(instances) == 1 and not not_read
    patients, encounters, raw = _mapping()
    rel = release_imaging(instances, patients=patients, encounters=encounters, raw_encounters=raw, key=KEY)
    staged, leaks = stage_imaging(
        keep_subjects(rel, [SUBJECT]),
        tmp_path / "stage",
        key=KEY,
        raw_identifiers={MRN, "ENC-0042", "Zorblatt"},
        raw_numeric_ids=set(),
    )
    assert leaks == [] and staged.staged is not None
    (path,) = (tmp_path / "stage").rglob("*.dcm")
    back = pydicom.dcmread(path)

    assert back.file_meta.TransferSyntaxUID == case.released
    withheld = {k: v for k, v in rel.counts.items() if k.startswith("pixels_dropped:")}
    assert withheld == ({f"pixels_dropped:{case.withheld}": 1} if case.withheld else {})
    # the header decided as the whole file does (the counts come from the headers alone)
    _, whole = deidentify(pydicom.dcmread(source), pseudonym=str(SUBJECT), shift_days=-7, key=KEY)
    assert whole == rel.log
    assert dicom_leaks({"released": back}, {MRN, "ENC-0042", "Zorblatt"}, set()) == []
    assert back.PatientID == str(SUBJECT) and back.BurnedInAnnotation == case.burned_in
    if case.withheld:
        assert "PixelData" not in back
        return
    assert back.PixelData == pixels
    assert back["PixelData"].is_undefined_length is case.released.is_encapsulated
    if case.frames:
        assert back.NumberOfFrames == case.frames  # what splits the fragments into frames
        frames = list(generate_frames(back.PixelData, number_of_frames=case.frames))
        assert frames == [f + b"\0" * (len(f) % 2) for f in FRAMES[: case.frames]]
        assert back.LossyImageCompression == ("01" if case.syntax == JPEGBaseline8Bit else "00")
    else:
        np.testing.assert_array_equal(back.pixel_array, NATIVE)
