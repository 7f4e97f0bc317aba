"""PACS imaging: DICOM headers de-identified per the DICOM PS3.15 Basic Application Level Confidentiality
Profile and turned into MEDS events.

A batch may carry a folder ``imaging/`` of DICOM files (``*.dcm``; headers alone, without pixel data, are
fine). Each file is read with pydicom (phi zone only), tied to its patient (``PatientID``, the MRN) and stay
(``AdmissionID``, else the patient's stay that holds the study time), and de-identified:

* the attributes of :data:`BASIC_PROFILE` get the profile's action: ``X`` removed, ``Z`` emptied (``PatientID``
  gets the patient's pseudonym instead, a dummy value the profile allows, so studies stay linkable), ``D``
  replaced by a dummy;
* every UID that is not a registered DICOM UID (``U``) is replaced by ``2.25.<int>``, the integer of a UUID
  derived from the original UID under a secret key: the same study gets the same new UID in every file and
  batch, and nobody without the key can recompute it (the key is a deployment secret: the HMAC pseudonym key,
  or a random key kept in the phi zone, see :func:`uid_key`);
* dates and date-times are shifted by the patient's shift (the anonymizer's whole-week shift, so weekdays and
  intervals are kept: the profile's *Retain Longitudinal Temporal Information with Modified Dates* option);
* private attributes are removed; then anything not on :data:`KEPT` (technical attributes, coded values,
  structured findings) is removed too, so an attribute the table does not name cannot carry a name across;
* ``BurnedInAnnotation`` ``YES`` (or ``RecognizableVisualFeatures`` ``YES``, or no flag at all on a modality
  that usually burns text in, :data:`BURN_IN_MODALITIES`): the pixel data are dropped, with the reason
  counted; the de-identified header is kept;
* the pixel data that leave are the source's bytes, never decoded or re-encoded, so the released file keeps
  the transfer syntax they are encoded in (:func:`released_transfer_syntax`): encapsulated (compressed)
  frames stay encapsulated under their codec's syntax, big endian stays big endian, and native little endian
  data (implicit VR, explicit VR, deflated) are written explicit VR little endian. Pixel data whose encoding
  is not known (a private or unknown transfer syntax) or not the one the file names (encapsulated under a
  native syntax, or the reverse) are dropped like burned-in pixels, with the reason counted.

A batch is released one file at a time, so memory holds about one file whatever the batch's size (a day of a
hospital's CT and MR is many gigabytes): :func:`release_imaging` reads headers only (:func:`read_header`, the
pixel data stay on disk) to decide which files leave, under which names, and to make the events; once the
boundary knows which patients are released (:func:`keep_subjects`), :func:`stage_imaging` reads each of their
files whole, de-identifies it, looks it through for identifiers and writes it into a staging folder, then lets
it go; the caller moves that folder into place when the batch is released, or removes it.

The events (:func:`imaging_events`): ``IMAGING//<modality>//<body part>`` at the study time (shifted) and
``IMAGING_FINDING//<scheme>:<code>`` for each coded finding of a structured report (``ContentSequence``
items of value type ``CODE``) at the report time; modality, body part and finding codes outside the
vocabulary (``vocabulary.yaml``, ``imaging``) become ``unmapped`` (never passed as text) or are dropped and
counted.
"""

import contextlib
import copy
import dataclasses
import hashlib
import hmac
import os
import secrets
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from clinical_ml.core.landing import DICOM_SUFFIX, IMAGING_FOLDER
from clinical_ml.core.units import IMAGING_BODY_PARTS, IMAGING_FINDINGS, IMAGING_MODALITIES

__all__ = ["DICOM_SUFFIX", "IMAGING_FOLDER"]  # the landing zone's names, used here and by the callers
UNMAPPED = "unmapped"
UID_ROOT = "2.25."
UID_KEY_FILE = "imaging_uid_key"
_UID_DOMAIN = b"clinical_ml/dicom_uid/v1\x00"
MIN_UID_KEY_BYTES = 32
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
IMAGING_CODE_PREFIX = "IMAGING//"
FINDING_CODE_PREFIX = "IMAGING_FINDING//"

# PS3.15 Annex E, Table E.1-1: the basic profile's action for the attributes handled here (keyword -> action).
# X remove; Z zero length (PatientID: the pseudonym, a consistent dummy); D dummy value. UIDs (U) are handled by
# value representation below: every non-standard UID in the dataset is replaced, whichever attribute holds it.
BASIC_PROFILE: dict[str, str] = {
    # the patient
    "PatientName": "Z",
    "PatientID": "Z",
    "IssuerOfPatientID": "X",
    "PatientBirthDate": "Z",
    "PatientBirthTime": "X",
    "PatientSex": "Z",
    "PatientAge": "X",
    "PatientSize": "X",
    "PatientWeight": "X",
    "OtherPatientIDs": "X",
    "OtherPatientIDsSequence": "X",
    "OtherPatientNames": "X",
    "PatientBirthName": "X",
    "PatientMotherBirthName": "X",
    "PatientAddress": "X",
    "PatientTelephoneNumbers": "X",
    "CountryOfResidence": "X",
    "RegionOfResidence": "X",
    "MilitaryRank": "X",
    "BranchOfService": "X",
    "EthnicGroup": "X",
    "Occupation": "X",
    "PatientReligiousPreference": "X",
    "MedicalRecordLocator": "X",
    "MedicalAlerts": "X",
    "Allergies": "X",
    "PregnancyStatus": "X",
    "SmokingStatus": "X",
    "AdditionalPatientHistory": "X",
    "PatientComments": "X",
    "PatientState": "X",
    "PatientInsurancePlanCodeSequence": "X",
    "ResponsiblePerson": "X",
    "ResponsibleOrganization": "X",
    # the visit and the order
    "AccessionNumber": "Z",
    "StudyID": "Z",
    "AdmissionID": "X",
    "IssuerOfAdmissionIDSequence": "X",
    "AdmittingDiagnosesDescription": "X",
    "AdmittingDiagnosesCodeSequence": "X",
    "RequestAttributesSequence": "X",
    "RequestedProcedureID": "X",
    "RequestedProcedureDescription": "X",
    "ScheduledProcedureStepID": "X",
    "PerformedProcedureStepID": "X",
    "PerformedProcedureStepDescription": "X",
    "ReasonForStudy": "X",
    "ReasonForTheRequestedProcedure": "X",
    "ReferencedPatientSequence": "X",
    "ReferencedStudySequence": "X",
    # institutions, people and devices
    "InstitutionName": "X",
    "InstitutionAddress": "X",
    "InstitutionalDepartmentName": "X",
    "InstitutionCodeSequence": "X",
    "ReferringPhysicianName": "Z",
    "ReferringPhysicianAddress": "X",
    "ReferringPhysicianTelephoneNumbers": "X",
    "ReferringPhysicianIdentificationSequence": "X",
    "PhysiciansOfRecord": "X",
    "PhysiciansOfRecordIdentificationSequence": "X",
    "PerformingPhysicianName": "X",
    "PerformingPhysicianIdentificationSequence": "X",
    "NameOfPhysiciansReadingStudy": "X",
    "PhysiciansReadingStudyIdentificationSequence": "X",
    "RequestingPhysician": "X",
    "RequestingService": "X",
    "ScheduledPerformingPhysicianName": "X",
    "OperatorsName": "X",
    "OperatorIdentificationSequence": "X",
    "VerifyingObserverName": "D",
    "PersonName": "D",
    "StationName": "X",
    "DeviceSerialNumber": "X",
    # free text
    "StudyDescription": "X",
    "SeriesDescription": "X",
    "ProtocolName": "X",
    "ImageComments": "X",
    "DerivationDescription": "X",
    "TextValue": "X",
}
# Dummy values of the ``D`` action, by value representation.
_DUMMY = {"PN": "ANONYMIZED", "LO": "ANONYMIZED", "SH": "ANON", "DA": "19000101", "TM": "000000"}

# What may leave: coded and technical attributes (everything else is removed after the profile's actions).
KEPT = frozenset(
    {
        # identity of the object (UIDs replaced) and the pseudonym
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "FrameOfReferenceUID",
        "PatientID",
        "PatientName",
        "PatientSex",
        "PatientBirthDate",
        "AccessionNumber",
        "StudyID",
        "ReferringPhysicianName",
        "VerifyingObserverName",
        "PersonName",
        # shifted dates and their times
        "StudyDate",
        "StudyTime",
        "SeriesDate",
        "SeriesTime",
        "AcquisitionDate",
        "AcquisitionTime",
        "ContentDate",
        "ContentTime",
        "InstanceCreationDate",
        "InstanceCreationTime",
        "AcquisitionDateTime",
        # what the study is
        "Modality",
        "BodyPartExamined",
        "SeriesNumber",
        "InstanceNumber",
        "ImageType",
        "BurnedInAnnotation",
        "RecognizableVisualFeatures",
        "PatientIdentityRemoved",
        "DeidentificationMethod",
        "DeidentificationMethodCodeSequence",
        "LongitudinalTemporalInformationModified",
        "SpecificCharacterSet",
        # pixels
        "Rows",
        "Columns",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "PixelSpacing",
        "SliceThickness",
        "PixelData",
        # what the pixel data need to be read as they are: frames of a multi-frame image, colour planes, and
        # whether a lossy codec made them (PS3.3 C.7.6.1.1.5)
        "NumberOfFrames",
        "PlanarConfiguration",
        "LossyImageCompression",
        "LossyImageCompressionRatio",
        "LossyImageCompressionMethod",
        # what the stored values mean and where the image lies in the scanner's frame (numbers only; PS3.15
        # Annex E does not list them): Hounsfield units of a CT, the display window, slice geometry
        "RescaleIntercept",
        "RescaleSlope",
        "WindowCenter",
        "WindowWidth",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "SpacingBetweenSlices",
        "SliceLocation",
        "PixelPaddingValue",
        # structured findings (coded items only)
        "ValueType",
        "ContentSequence",
        "ConceptNameCodeSequence",
        "ConceptCodeSequence",
        "CodeValue",
        "CodingSchemeDesignator",
        "RelationshipType",
        "CompletionFlag",
        "VerificationFlag",
    }
)
# Text a coded item may carry beside its code (CodeMeaning): free text, dropped.
_PIXEL_ATTRIBUTES = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
_UNDEFINED_LENGTH = 0xFFFFFFFF
# The encoding of a dataset read without a transfer syntax in its file meta (pydicom guessed it), as the
# native syntax that names it: (implicit VR, little endian) -> syntax.
_NATIVE_SYNTAX = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}
# Values larger than this are not read with a header (pixel data above all); any other large value is read
# from the file when the header is decoded.
_DEFER_BYTES = 64 * 1024
# Modalities that usually carry burned-in text (ultrasound, secondary capture, photographs): without a flag
# saying otherwise, their pixels are not released.
BURN_IN_MODALITIES = frozenset({"US", "SC", "OT", "XC", "ES", "GM", "SM", "DOC"})
DEIDENTIFICATION_METHOD = "DICOM PS3.15 E.1 basic profile; modified dates; clinical_ml"
# PS3.16 CID 7050 codes of the profile and the option applied (DCM scheme).
_METHOD_CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
)


class DicomRejected(ValueError):
    """A file that is not usable DICOM; the message names a reason, never a value."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _create_key(path: Path) -> None:
    """Write a new random key whole, then link it into place: a run killed on the way leaves no key or a
    whole one (never an empty one), and of two runs creating it at once the first link wins for both."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # owner-only (0600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(MIN_UID_KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):  # another run's key is already in place: it is the key
            os.link(tmp, path)
    finally:
        os.unlink(tmp)


def uid_key(*, phi_dir: Path, hmac_secret: bytes | None = None) -> bytes:
    """The secret that new UIDs are derived under.

    In HMAC mode the pseudonym key (domain-separated below), so every deployment with the same key gives the
    same UIDs; in vault mode a random key created once in the phi zone (``<phi>/imaging_uid_key``, owner-only),
    the imaging counterpart of the vault: it never leaves the phi zone.
    """
    if hmac_secret is not None:
        return hmac_secret
    path = Path(phi_dir) / UID_KEY_FILE
    if path.exists() and path.stat().st_size == 0:
        path.unlink()  # a creation killed before it wrote (older releases): no UID was ever derived under it
    if not path.exists():
        _create_key(path)
    key = path.read_bytes()
    if len(key) < MIN_UID_KEY_BYTES:
        raise ValueError(f"the imaging UID key in the phi zone ({UID_KEY_FILE}) is shorter than 32 bytes")
    return key


def new_uid(original: str, *, key: bytes) -> str:
    """``2.25.<int>`` of a UUID derived from ``original`` under ``key`` (PS3.5 B.2): consistent, not reversible."""
    digest = hmac.new(key, _UID_DOMAIN + original.strip().encode(), hashlib.sha256).digest()
    return UID_ROOT + str(uuid.UUID(bytes=digest[:16], version=4).int)


def _shift_da(value: str, days: int) -> str:
    return (datetime.strptime(value[:8], "%Y%m%d").date() + timedelta(days=days)).strftime("%Y%m%d")


def _shift_dt(value: str, days: int) -> str:
    return _shift_da(value[:8], days) + value[8:]


@dataclass
class DeidLog:
    """What the de-identification of one or more datasets did (counts only)."""

    actions: Counter = field(default_factory=Counter)
    """``<action>:<keyword>`` -> times applied (``X:PatientAddress``, ``U`` for UIDs, ``shift`` for dates)."""
    pixels_dropped: Counter = field(default_factory=Counter)
    """reason -> instances whose pixel data were dropped."""

    def merge(self, other: "DeidLog") -> None:
        self.actions.update(other.actions)
        self.pixels_dropped.update(other.pixels_dropped)


def _burn_in_reason(ds: Dataset) -> str | None:
    flag = str(ds.get("BurnedInAnnotation", "")).strip().upper()
    faces = str(ds.get("RecognizableVisualFeatures", "")).strip().upper()
    if flag == "YES":
        return "burned_in_annotation"
    if faces == "YES":
        return "recognizable_visual_features"
    if not flag and str(ds.get("Modality", "")).strip().upper() in BURN_IN_MODALITIES:
        return "burned_in_annotation_unknown"
    return None


def _named_syntax(ds: Dataset) -> UID | None:
    """The transfer syntax ``ds``'s file meta names, if it names one."""
    meta = getattr(ds, "file_meta", None)
    named = str(meta.get("TransferSyntaxUID", "") or "").strip() if meta is not None else ""
    return UID(named) if named else None


def source_transfer_syntax(ds: Dataset) -> UID | None:
    """The transfer syntax ``ds`` was read in: its file meta's, else the one that names the encoding pydicom
    read it in (a file without one in its meta); ``None`` for a dataset made in memory."""
    named = _named_syntax(ds)
    if named is not None:
        return named
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        return None
    return _NATIVE_SYNTAX.get((implicit, little))


def _is_encapsulated(elem: DataElement | RawDataElement) -> bool:
    """Whether pixel data are encapsulated (fragments in items, PS3.5 A.4): their length is undefined."""
    if isinstance(elem, DataElement):
        return bool(elem.is_undefined_length)
    return elem.length == _UNDEFINED_LENGTH


def released_transfer_syntax(
    source: UID | None, pixels: DataElement | RawDataElement | None
) -> tuple[UID, str | None]:
    """The transfer syntax of a released file, and why its pixel data cannot leave (``None``: they can).

    The pixel data leave as the source's bytes, so the released file must name the syntax they are encoded
    in: an encapsulated syntax is kept (its frames are the codec's), and so is big endian (a little endian
    label would need every value swapped); native little endian data are written explicit VR little endian,
    the encoding every reader takes, deflate included (it wraps the dataset, not the pixel data, and a
    released file is read as it is: a deflated one hides its text from a byte scan). Pixel data under a
    syntax that pydicom does not know (private, or newer than pydicom), under none (a dataset made in
    memory with encapsulated pixel data), or not encoded as their syntax says, cannot be labelled: they are
    withheld, the reason ``unknown_transfer_syntax`` or ``pixel_data_inconsistent_with_transfer_syntax``,
    and the header is written explicit VR little endian (big endian, read big endian, stays so).

    Parameters
    ----------
    source
        :func:`source_transfer_syntax` of the source dataset (``None``: made in memory, explicit VR little
        endian).
    pixels
        The ``PixelData`` element that would leave (``None``: none does).
    """
    known = source is not None and source in AllTransferSyntaxes
    header = ExplicitVRBigEndian if source == ExplicitVRBigEndian else ExplicitVRLittleEndian
    if pixels is None:
        return header, None
    encapsulated = _is_encapsulated(pixels)
    if source is None:
        return (ExplicitVRLittleEndian, "unknown_transfer_syntax" if encapsulated else None)
    if not known:
        return header, "unknown_transfer_syntax"
    if encapsulated != source.is_encapsulated:
        return header, "pixel_data_inconsistent_with_transfer_syntax"
    return (source if source.is_encapsulated else header), None


def deidentify(ds: Dataset, *, pseudonym: str, shift_days: int, key: bytes) -> tuple[Dataset, DeidLog]:
    """A de-identified copy of ``ds`` (see the module docstring); ``ds`` is left as it is.

    The copy's file meta holds one element, the transfer syntax it is to be written in
    (:func:`released_transfer_syntax`); :func:`write_dicom` builds the rest from the copy's own UIDs.

    Parameters
    ----------
    ds
        A dataset read from the landing zone (phi).
    pseudonym
        The patient's ``subject_id`` as text: the new ``PatientID`` (and ``PatientName``).
    shift_days
        The patient's date shift (whole weeks, from the anonymizer).
    key
        The UID secret (:func:`uid_key`).
    """
    out = _deep_copy(ds)
    log = DeidLog()
    reason = _burn_in_reason(out)
    if reason is not None and any(a in out for a in _PIXEL_ATTRIBUTES):
        for a in _PIXEL_ATTRIBUTES:
            if a in out:
                del out[a]
        log.pixels_dropped[reason] += 1
    syntax, unlabelled = released_transfer_syntax(source_transfer_syntax(ds), out.get_item(0x7FE00010))
    if unlabelled is not None:
        del out[0x7FE00010]
        log.pixels_dropped[unlabelled] += 1
    out.file_meta = FileMetaDataset()
    out.file_meta.TransferSyntaxUID = syntax
    private: list[int] = []
    out.walk(lambda _d, e: private.append(1) if e.tag.is_private else None)
    out.remove_private_tags()
    if private:
        log.actions["X:private"] += len(private)

    def act(dataset: Dataset, elem: pydicom.DataElement) -> None:
        keyword = elem.keyword
        action = BASIC_PROFILE.get(keyword)
        if elem.tag.is_private:
            return
        if action == "X":
            del dataset[elem.tag]
        elif action == "Z":
            elem.value = pseudonym if keyword in ("PatientID", "PatientName") else ""
        elif action == "D":
            elem.value = _DUMMY.get(elem.VR, "")
        elif elem.VR == "UI" and elem.value:
            values = elem.value if elem.VM > 1 else [elem.value]
            replaced = [v if not UID(str(v)).is_private else new_uid(str(v), key=key) for v in values]
            elem.value = replaced if elem.VM > 1 else replaced[0]
            action = "U" if replaced != list(values) else None
        elif elem.VR in ("DA", "DT") and elem.value:
            try:
                shift = _shift_da if elem.VR == "DA" else _shift_dt
                elem.value = shift(str(elem.value), shift_days)
                action = "shift"
            except ValueError:
                del dataset[elem.tag]  # a date that does not parse cannot be shifted: it does not leave
                action = "X"
        if action:
            log.actions[f"{action}:{keyword}" if action not in ("U", "shift") else action] += 1

    out.walk(act)

    def allow(dataset: Dataset, elem: pydicom.DataElement) -> None:
        if elem.keyword not in KEPT:
            log.actions["removed_not_allowlisted"] += 1
            del dataset[elem.tag]

    out.walk(allow)
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = DEIDENTIFICATION_METHOD
    out.LongitudinalTemporalInformationModified = "MODIFIED"
    method = []
    for value, meaning in _METHOD_CODES:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        method.append(item)
    out.DeidentificationMethodCodeSequence = method
    return out, log


def _deep_copy(ds: Dataset) -> Dataset:
    """A deep copy without the file meta (rebuilt for the de-identified file: it names the source's UIDs)."""
    out = copy.deepcopy(ds)
    if hasattr(out, "file_meta"):
        del out.file_meta
    return out


@dataclass(frozen=True)
class ImagingInstance:
    """One DICOM file of a batch (phi zone): where it is and the keys it is tied by. Nothing of the file is
    held: it is read when the batch is released (:func:`read_header`, then whole by :func:`stage_imaging`)."""

    name: str
    path: Path
    mrn: str | None
    admission_id: str | None


def read_header(path: Path) -> Dataset:
    """A DICOM file without its pixel data: every other element decoded, and each pixel attribute the file
    has (``PixelData``, ``FloatPixelData``, ``DoubleFloatPixelData``) present with an empty value, so that
    :func:`deidentify` decides and counts on the header exactly what it does on the whole file (an
    encapsulated one stays marked so: its length stays undefined)."""
    ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
    for tag in _PIXEL_TAGS:
        if tag in ds:
            raw = ds.get_item(tag, keep_deferred=True)  # a deferred value stays on disk
            empty = DataElement(tag, raw.VR or "OB", b"", is_undefined_length=_is_encapsulated(raw))
            ds[tag] = empty
    for _ in ds.iterall():  # decodes every other value now (a deferred one is read from the file)
        pass
    return ds


def read_imaging(batch_dir: Path) -> tuple[list[ImagingInstance], Counter]:
    """The DICOM files of ``<batch>/imaging/`` in name order, and files not read by reason
    (``not_dicom``, ``not_regular_file``). Only headers are read, one file at a time."""
    folder = Path(batch_dir) / IMAGING_FOLDER
    rejected: Counter = Counter()
    out: list[ImagingInstance] = []
    if not folder.is_dir() or folder.is_symlink():
        return out, rejected
    for p in sorted(folder.iterdir()):
        if p.is_symlink() or not p.is_file():
            rejected["not_regular_file"] += 1
            continue
        if p.suffix.lower() != DICOM_SUFFIX:
            rejected["not_dicom"] += 1
            continue
        try:
            ds = read_header(p)
        except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError):
            rejected["not_dicom"] += 1
            continue
        mrn = str(ds.get("PatientID", "")).strip().upper() or None
        adm = str(ds.get("AdmissionID", "")).strip().upper() or None
        out.append(ImagingInstance(p.name, p, mrn, adm))
    return out, rejected


def _study_time(ds: Dataset, date_kw: str = "StudyDate", time_kw: str = "StudyTime") -> datetime | None:
    d = str(ds.get(date_kw, "")).strip()
    if len(d) < 8:
        return None
    try:
        day = datetime.strptime(d[:8], "%Y%m%d")
    except ValueError:
        return None
    t = str(ds.get(time_kw, "")).strip().split(".")[0]
    if len(t) >= 4 and t.isdigit():
        t = t.ljust(6, "0")
        try:
            return day.replace(hour=int(t[:2]), minute=int(t[2:4]), second=int(t[4:6]))
        except ValueError:
            return day
    return day


def _known_from(ds: Dataset, at: datetime, time_kw: str = "StudyTime") -> datetime:
    """When a (shifted) study time may be used: at once when the header gives the time of day; with a date
    alone (``at`` is midnight), from the end of that day, so a feature never sees a study before it was done."""
    t = str(ds.get(time_kw, "")).strip()
    if len(t) >= 4 and t[:4].isdigit():
        return at
    return at.replace(hour=0, minute=0, second=0) + timedelta(days=1, seconds=-1)


def _findings(ds: Dataset) -> list[str]:
    """``<scheme>:<code>`` of the coded findings (value type ``CODE``) of a structured report's content."""
    out = []
    for item in ds.get("ContentSequence", []) or []:
        if str(item.get("ValueType", "")).upper() != "CODE":
            continue
        for concept in item.get("ConceptCodeSequence", []) or []:
            scheme = str(concept.get("CodingSchemeDesignator", "")).strip().upper()
            code = str(concept.get("CodeValue", "")).strip()
            if scheme and code:
                out.append(f"{scheme}:{code}")
    return out


@dataclass(frozen=True)
class ReleasedFile:
    """One file to release: its source (phi zone) and the patient's pseudonym and date shift it is
    de-identified under."""

    source: Path
    subject_id: str
    shift_days: int


@dataclass(frozen=True)
class ImagingRelease:
    """The imaging of one batch across the boundary.

    ``files`` maps a new file name (the new SOP instance UID) to the file it is made from; ``events`` are
    MEDS rows (``subject_id``, ``time``, ``code``, ``numeric_value``, ``hadm_id``, ``available_time``,
    ``implausible``); ``counts`` are PHI-free counts by reason; ``staged``: the folder holding the
    de-identified files (``<subject_id>/<name>``) once :func:`stage_imaging` wrote them all, else ``None``.
    """

    files: dict[str, ReleasedFile]
    events: pl.DataFrame
    counts: dict[str, int]
    log: DeidLog
    staged: Path | None = None


EVENT_SCHEMA = pl.Schema(
    {
        "subject_id": pl.Int64(),
        "time": pl.Datetime("us"),
        "code": pl.String(),
        "numeric_value": pl.Float32(),
        "hadm_id": pl.Int64(),
        "available_time": pl.Datetime("us"),
        "implausible": pl.Boolean(),
    }
)


def _controlled(value: object, allowed: Iterable[str]) -> str:
    v = str(value or "").strip().upper()
    return v if v in allowed else UNMAPPED


def _stay_of(
    mrn: str,
    admission_id: str | None,
    at: datetime | None,
    stays: pl.DataFrame,
    *,
    until: datetime | None = None,
) -> tuple[str | None, str]:
    """The encounter of a study: its ``AdmissionID`` when it is one of the patient's stays, else the stay whose
    admission..discharge holds the study time (or overlaps ``at``..``until``, the day of a study known by its
    date alone); and how it was found."""
    mine = stays.filter(pl.col("_mrn") == mrn)
    if admission_id is not None and admission_id in mine["_enc"].to_list():
        return admission_id, "by_admission_id"
    if at is not None:
        hit = mine.filter(
            (pl.col("admit_time") <= (until or at))
            & (pl.col("discharge_time").is_null() | (pl.col("discharge_time") >= at))
        )
        if hit.height:
            return str(hit["_enc"][0]), "by_study_time"
    return None, "no_stay"


def release_imaging(
    instances: list[ImagingInstance],
    *,
    patients: pl.DataFrame,
    encounters: pl.DataFrame,
    raw_encounters: pl.DataFrame,
    key: bytes,
) -> ImagingRelease:
    """De-identify a batch's DICOM files and turn them into events.

    Parameters
    ----------
    instances
        From :func:`read_imaging` or :func:`clinical_ml.core.imaging.accepted_instances`; only their headers
        are read here, one at a time (the files are de-identified whole by :func:`stage_imaging`).
    patients, encounters
        The pseudonym mapping of the batch as the anonymizer returns it (``DeidBatch.vault``, in vault or HMAC
        mode): ``mrn`` (normalized), ``subject_id``, ``shift_days``; ``encounter_id`` (normalized), ``hadm_id``.
    raw_encounters
        The batch's accepted encounters (``encounter_id``, ``mrn``, ``admit_time``, ``discharge_time``), to tie a
        study without an ``AdmissionID`` to its stay.
    key
        The UID secret (:func:`uid_key`).

    A file whose patient has no pseudonym (not delivered, or withheld) is not released (``no_patient``).
    Names, counts and the log are those of the whole files: the header is de-identified as the file is.
    """
    pseud = {r["mrn"]: (r["subject_id"], r["shift_days"]) for r in patients.iter_rows(named=True)}
    hadm = {r["encounter_id"]: r["hadm_id"] for r in encounters.iter_rows(named=True)}
    stays = raw_encounters.select(
        pl.col("encounter_id").cast(pl.String).str.strip_chars().str.to_uppercase().alias("_enc"),
        pl.col("mrn").cast(pl.String).str.strip_chars().str.to_uppercase().alias("_mrn"),
        "admit_time",
        "discharge_time",
    )
    counts: Counter = Counter()
    log = DeidLog()
    files: dict[str, ReleasedFile] = {}
    rows: list[dict] = []
    studies_seen: set[str] = set()
    for inst in instances:
        if inst.mrn is None or inst.mrn not in pseud:
            counts["not_released:no_patient"] += 1
            continue
        subject_id, shift = pseud[inst.mrn]
        header = read_header(inst.path)
        at = _study_time(header)
        until = None if at is None else _known_from(header, at)
        enc, how = _stay_of(inst.mrn, inst.admission_id, at, stays, until=until)
        counts[f"stay:{how}"] += 1
        deid, one_log = deidentify(header, pseudonym=str(subject_id), shift_days=int(shift), key=key)
        log.merge(one_log)
        name = f"{deid.SOPInstanceUID}{DICOM_SUFFIX}" if "SOPInstanceUID" in deid else None
        if name is None:
            counts["not_released:no_sop_instance_uid"] += 1
            continue
        files[name] = ReleasedFile(Path(inst.path), str(deid.get("PatientID", "")), int(shift))
        counts["instances_released"] += 1
        study = str(deid.get("StudyInstanceUID", ""))
        hadm_id = hadm.get(enc) if enc is not None else None
        shifted = None if at is None else at + timedelta(days=int(shift))
        if study and study not in studies_seen and shifted is not None:
            studies_seen.add(study)
            modality = _controlled(header.get("Modality"), IMAGING_MODALITIES)
            body = _controlled(header.get("BodyPartExamined"), IMAGING_BODY_PARTS)
            counts["unmapped:modality"] += modality == UNMAPPED
            counts["unmapped:body_part"] += body == UNMAPPED
            code = f"{IMAGING_CODE_PREFIX}{modality}//{body}"
            rows.append(_event(subject_id, shifted, code, hadm_id, _known_from(header, shifted)))
        elif shifted is None:
            counts["no_study_time"] += 1
        found = _findings(header)
        if found:
            content = _study_time(header, "ContentDate", "ContentTime")
            report, time_kw = (content, "ContentTime") if content is not None else (at, "StudyTime")
            when = None if report is None else report + timedelta(days=int(shift))
            for code in found:
                if code not in IMAGING_FINDINGS:
                    counts["finding_not_in_vocabulary"] += 1
                elif when is not None:
                    known = _known_from(header, when, time_kw)
                    rows.append(_event(subject_id, when, FINDING_CODE_PREFIX + code, hadm_id, known))
    events = pl.DataFrame(rows, schema=EVENT_SCHEMA) if rows else pl.DataFrame(schema=EVENT_SCHEMA)
    counts["studies"] = len(studies_seen)
    counts["events"] = events.height
    counts |= {f"pixels_dropped:{k}": v for k, v in log.pixels_dropped.items()}
    return ImagingRelease(files, events, {k: int(v) for k, v in counts.items() if v}, log)


def keep_subjects(release: ImagingRelease, subject_ids: Iterable[int]) -> ImagingRelease:
    """``release`` with only the files of ``subject_ids`` (the patients the boundary released after consent
    and suppression); the others are counted as ``not_released:withheld``. Events are left as they are: the
    batch's events table is filtered with the rest. Called before :func:`stage_imaging`, so a withheld
    patient's file is never written."""
    if release.staged is not None:
        raise ValueError(
            "keep_subjects runs before stage_imaging: the staged folder would keep withheld files"
        )
    kept_ids = {str(s) for s in subject_ids}
    kept = {n: f for n, f in release.files.items() if f.subject_id in kept_ids}
    counts = dict(release.counts)
    withheld = len(release.files) - len(kept)
    if withheld:
        counts["not_released:withheld"] = counts.get("not_released:withheld", 0) + withheld
        counts["instances_released"] = len(kept)
        if not kept:
            counts.pop("instances_released")
    return ImagingRelease(kept, release.events, counts, release.log)


def _identifying_text(elem: pydicom.DataElement) -> list[str]:
    if elem.VR == "PN":
        return [p for v in (elem.value if elem.VM > 1 else [elem.value]) for p in str(v).split("^") if p]
    if elem.VR in ("SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN") or elem.value is None:
        return []
    values = elem.value if elem.VM > 1 else [elem.value]
    return [str(v).strip() for v in values if str(v).strip()]


def dicom_leaks(
    datasets: Mapping[str, Dataset], raw_identifiers: set[str], raw_numeric_ids: set[int]
) -> list[str]:
    """Reasons why de-identified datasets are unsafe to release (empty: safe), in counts and keywords of the
    profile, never a value: a private attribute, an attribute not on :data:`KEPT`, a UID that is neither a
    registered DICOM UID nor one of ours (``2.25.``), a birth date, or a value equal to one of the batch's raw
    identifiers (MRNs, encounter numbers, addresses, phones, e-mails, birth dates)."""
    found: Counter = Counter()
    for ds in datasets.values():
        found.update(_leaks_of(ds, raw_identifiers, {str(i) for i in raw_numeric_ids}))
    return _leak_reasons(found)


def _leak_reasons(found: Counter) -> list[str]:
    return [f"imaging: {n} x {what}" for what, n in sorted(found.items())]


def _leaks_of(ds: Dataset, raw_identifiers: set[str], numeric: set[str]) -> Counter:
    """What :func:`dicom_leaks` finds in one de-identified dataset, by reason."""
    found: Counter = Counter()

    def look(elem: pydicom.DataElement) -> None:
        if elem.tag.is_private:
            found["private attribute"] += 1
        elif elem.keyword not in KEPT:
            found[f"attribute outside the allowlist ({elem.keyword or 'unnamed'})"] += 1
        elif elem.VR == "UI" and elem.value:
            for v in elem.value if elem.VM > 1 else [elem.value]:
                if UID(str(v)).is_private and not str(v).startswith(UID_ROOT):
                    found[f"{elem.keyword} not replaced"] += 1
        elif elem.keyword == "PatientBirthDate" and elem.value:
            found["PatientBirthDate kept"] += 1
        if not elem.tag.is_private and any(
            t in raw_identifiers or t in numeric for t in _identifying_text(elem)
        ):
            found[f"{elem.keyword or 'an attribute'} holds a raw identifier value"] += 1

    method = {(v, "DCM", m) for v, m in _METHOD_CODES}

    def walk(ds: Dataset) -> None:
        for elem in ds:
            if elem.keyword == "DeidentificationMethodCodeSequence":
                # written by deidentify itself: the profile's codes and their meanings, nothing else
                items = {(_text(i, "CodeValue"), _text(i, "CodingSchemeDesignator"), _text(i, "CodeMeaning"))
                         for i in elem.value}  # fmt: skip
                if not items <= method or any(len(i) != 3 for i in elem.value):
                    found["DeidentificationMethodCodeSequence not the profile's"] += 1
                continue
            look(elem)
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)

    walk(ds)
    return found


def stage_imaging(
    release: ImagingRelease,
    folder: Path,
    *,
    key: bytes,
    raw_identifiers: set[str],
    raw_numeric_ids: set[int],
) -> tuple[ImagingRelease, list[str]]:
    """De-identify the files of ``release`` one at a time and write them into ``folder``
    (``<subject_id>/<name>``, each file written whole and then renamed into place), looking each through for
    identifiers (:func:`dicom_leaks`) before it is written: memory holds one file, whatever the batch's size.

    ``folder`` is emptied first (a run killed before left it). The first file found unsafe stops the writing
    and removes the folder (the batch will not be released: nothing unsafe waits on disk); the others are
    still looked through, so the reasons count every file. Returns ``release`` with ``staged`` set (``None``
    when something was found) and the reasons (empty: safe).

    Raises
    ------
    RuntimeError
        A file no longer gives the name its header gave (it changed while the batch was released).
    """
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    numeric = {str(i) for i in raw_numeric_ids}
    found: Counter = Counter()
    for name, plan in sorted(release.files.items()):
        deid, _ = deidentify(
            pydicom.dcmread(plan.source), pseudonym=plan.subject_id, shift_days=plan.shift_days, key=key
        )
        if f"{deid.get('SOPInstanceUID', '')}{DICOM_SUFFIX}" != name:
            raise RuntimeError("a DICOM file changed while its batch was released; run the release again")
        leaks = _leaks_of(deid, raw_identifiers, numeric)
        if leaks and not found:
            shutil.rmtree(folder, ignore_errors=True)
        found.update(leaks)
        if not found:
            write_dicom(deid, folder / plan.subject_id / name)
        del deid
    if not found and release.files:
        folder.mkdir(parents=True, exist_ok=True)
    staged = folder if not found and release.files else None
    return dataclasses.replace(release, staged=staged), _leak_reasons(found)


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _event(subject_id: int, at: datetime, code: str, hadm_id: int | None, available: datetime) -> dict:
    return {
        "subject_id": subject_id,
        "time": at,
        "code": code,
        "numeric_value": None,
        "hadm_id": hadm_id,
        "available_time": available,
        "implausible": False,
    }


def write_dicom(ds: Dataset, path: Path) -> None:
    """Write ``ds`` as a DICOM file (PS3.10: preamble, file meta from its own SOP class and instance UIDs),
    through a hidden temporary file renamed into place: never half a file.

    The transfer syntax is the one ``ds.file_meta`` names (:func:`deidentify` names the one its pixel data
    are in), else explicit VR little endian. Encapsulated pixel data are marked by an undefined length
    (``ds["PixelData"].is_undefined_length``, as pydicom reads them).

    Raises
    ------
    DicomRejected
        The syntax is not one pydicom knows, or the pixel data are not encoded as it says (encapsulated under
        a native syntax or the reverse): the file would be read wrong, so none is written.
    """
    syntax = _named_syntax(ds) or ExplicitVRLittleEndian
    if syntax not in AllTransferSyntaxes:
        raise DicomRejected("unknown_transfer_syntax")
    if "PixelData" in ds and _is_encapsulated(ds.get_item(0x7FE00010)) != syntax.is_encapsulated:
        raise DicomRejected("pixel_data_inconsistent_with_transfer_syntax")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(str(ds.get("SOPClassUID", "")) or SECONDARY_CAPTURE)
    meta.MediaStorageSOPInstanceUID = UID(str(ds.get("SOPInstanceUID", "")))
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    # created as open() would create the file itself (mode 0666 less the umask), not owner-only like mkstemp
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            ds.save_as(f, enforce_file_format=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_released(datasets: Mapping[str, Dataset], folder: Path) -> list[Path]:
    """Write de-identified datasets as DICOM files (names are new UIDs: nothing of the source's)."""
    out = []
    for name, ds in sorted(datasets.items()):
        write_dicom(ds, folder / name)
        out.append(folder / name)
    return out
