"""Canary test of the PHI boundary.

Unique fake identifiers (names, MRNs, encounter numbers, phone, email, address, free text, and the HMAC
secret itself) are planted into the synthetic exports, as are free text typed into the coded fields
(discharge disposition, unit, site) and a patient's name used as a column header; the real graph runs in process in HMAC mode; then
every file of every zone below the boundary (deid, registry, reports), every file of the Dagster instance
(event log database, compute logs) and every event log record are scanned. Zero hits allowed.

The synthetic hospital also delivers medications, diagnoses, procedures, device vitals and DICOM headers; the
canary patients' DICOM files carry their names, MRN, encounter number, accession number, study UIDs, address,
phone, e-mail and a private attribute with the MRN. The same graph run ingests them (``raw_imaging``) and
de-identifies them at the boundary into ``deid/imaging/``, which is scanned with the rest of the zone; each
released file is also read back and checked attribute by attribute: no tag identifying a person may survive.

A positive control scans the landing and phi zones with the same scanner and must find the canaries, so a
scanner that finds nothing proves nothing.
"""

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import polars as pl
import pydicom
import pytest

from clinical_ml.core.anonymization import keyed_mapping
from clinical_ml.core.clinical_sources import MORE_SOURCES
from clinical_ml.core.dicom import IMAGING_FOLDER, KEPT, UID_ROOT, write_dicom
from clinical_ml.core.landing import find_complete_batches
from clinical_ml.core.pseudonyms import SECRET_ENV_VAR, HmacKey
from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital, write_completion_marker
from clinical_ml.defs.conventions import BATCH_PARTITIONS_NAME

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BELOW_BOUNDARY = ("deid", "registry", "reports")
CANARY_SECRET = "CNRYSECRET" + "7f3a9c2e1b" * 4
CONFIG = SyntheticConfig(n_patients=900, n_batches=2, n_sites=2, seed=29, more_sources=True, imaging=True)
# Free text typed into coded fields of the canary patients' stays, and a name as a column header: none of it
# is in a controlled vocabulary, so none of it may cross (issue 17, class 1).
CODED_FIELD_CANARIES = {
    "discharge_disposition": "HOME with daughter Alice Canarybeak",
    "unit": "Ward 3 of Dr Canaryfeather",
    "site": "Canarynest Clinic of Alice Canarybeak",
}
HEADER_CANARY = "Zephyrine Headerwood"


@dataclass(frozen=True)
class Canary:
    mrn: str
    encounter_ids: tuple[str, ...]
    first_name: str
    last_name: str
    phone: str
    email: str
    address: str
    dicom: tuple[str, ...] = ()
    """Accession numbers and study/instance UIDs of the patient's DICOM files."""

    def tokens(self) -> dict[str, str]:
        full = f"{self.first_name} {self.last_name}"
        out = {
            "mrn": self.mrn,
            "first_name": self.first_name,
            "last_name": self.last_name,
            "full_name": full,
            "phone": self.phone,
            "email": self.email,
            "address": self.address,
        }
        out |= {f"encounter_id_{i}": e for i, e in enumerate(self.encounter_ids)}
        return out | {f"dicom_{i}": v for i, v in enumerate(self.dicom)}


def _plant(landing: Path) -> tuple[list[Canary], str]:
    """Replace the identifiers of a few real synthetic patients by canaries, in every batch and file."""
    batches = sorted(p for p in landing.iterdir() if p.is_dir())
    read = {
        b: {s: pl.read_csv(b / f"{s}.csv", infer_schema=False) for s in ("patients", "encounters")}
        for b in batches
    }
    first = read[batches[0]]
    chosen = first["patients"]["mrn"].head(4).to_list()
    canaries: list[Canary] = []
    replace_mrn: dict[str, str] = {}
    replace_enc: dict[str, str] = {}
    replace_text: dict[str, str] = {}
    for i, old_mrn in enumerate(chosen):
        # a numeric MRN shaped like the real ones, and alphanumeric ones that no generator would produce
        new_mrn = f"9{4417 + i:07d}" if i == 0 else f"CNRYMRN{4417 + i}"
        old_row = (
            pl.concat([read[b]["patients"] for b in batches])
            .filter(pl.col("mrn") == old_mrn)
            .row(0, named=True)
        )
        old_encs = pl.concat([read[b]["encounters"] for b in batches]).filter(pl.col("mrn") == old_mrn)[
            "encounter_id"
        ]
        c = Canary(
            mrn=new_mrn,
            encounter_ids=tuple(f"CNRY-ENC-{4417 + i}-{j}" for j in range(old_encs.len())),
            first_name=f"Quixotla{'ABCD'[i]}",
            last_name=f"Canarywing{'ABCD'[i]}",
            phone=f"(212) 555-{4417 + i:04d}",
            email=f"quixotla.canarywing{i}@canary.invalid",
            address=f"{4417 + i} Canarywing Lane",
        )
        canaries.append(c)
        replace_mrn[old_mrn] = new_mrn
        replace_enc |= dict(zip(old_encs.to_list(), c.encounter_ids, strict=True))
        replace_text |= {
            old_row["first_name"]: c.first_name,
            old_row["last_name"]: c.last_name,
            old_row["phone"]: c.phone,
        }
    for b in batches:
        pats, encs = read[b]["patients"], read[b]["encounters"]
        pats = pats.with_columns(pl.col("mrn").replace(replace_mrn))
        hit = pl.col("mrn").is_in(list(replace_mrn.values()))
        by_mrn = {c.mrn: c for c in canaries}
        for field in ("first_name", "last_name", "phone", "email", "address"):
            pats = pats.with_columns(
                pl.when(hit)
                .then(
                    pl.col("mrn").replace_strict(
                        {m: getattr(c, field) for m, c in by_mrn.items()}, default=None
                    )
                )
                .otherwise(pl.col(field))
                .alias(field)
            )
        # free text in a column the contract does not know, on top of the encounters' note
        pats = pats.with_columns(
            pl.when(hit)
            .then(pl.format("call {} at home", pl.col("phone")))
            .otherwise(pl.lit("no remarks"))
            .alias("comment")
        )
        # a patient's name as the header of a column the contract does not know
        pats.with_columns(pl.lit("seen").alias(HEADER_CANARY)).write_csv(b / "patients.csv")
        encs = encs.with_columns(
            pl.col("mrn").replace(replace_mrn), pl.col("encounter_id").replace(replace_enc)
        )
        canary_stay = pl.col("mrn").is_in(list(replace_mrn.values()))
        encs = encs.with_columns(
            pl.when(canary_stay).then(pl.lit(text)).otherwise(pl.col(field)).alias(field)
            for field, text in CODED_FIELD_CANARIES.items()
        )
        note = pl.col("note")
        for old, new in replace_text.items():
            note = note.str.replace_all(old, new, literal=True)
        encs.with_columns(note.alias("note")).write_csv(b / "encounters.csv")
        for s in ("labs", "vitals", *MORE_SOURCES):
            ev = pl.read_csv(b / f"{s}.csv", infer_schema=False)
            ev.with_columns(pl.col("encounter_id").replace(replace_enc)).write_csv(b / f"{s}.csv")
        write_completion_marker(b)
    return _plant_dicom(batches, canaries, replace_mrn, replace_enc, replace_text), CANARY_SECRET


def _plant_dicom(
    batches: list[Path],
    canaries: list[Canary],
    replace_mrn: dict[str, str],
    replace_enc: dict[str, str],
    replace_text: dict[str, str],
) -> list[Canary]:
    """The canary patients' DICOM files carry the canaries; a canary patient without imaging gets a copy of
    another patient's first file, made theirs."""
    by_mrn = {c.mrn: c for c in canaries}
    tokens: dict[str, list[str]] = {c.mrn: [] for c in canaries}
    spare = sorted((batches[0] / IMAGING_FOLDER).glob("*.dcm"))[0]
    for b in batches:
        for path in sorted((b / IMAGING_FOLDER).glob("*.dcm")):
            ds = pydicom.dcmread(path)
            if ds.PatientID not in replace_mrn:
                continue
            c = by_mrn[replace_mrn[ds.PatientID]]
            _make_theirs(
                ds, c, replace_enc.get(str(ds.get("AdmissionID", "")), c.encounter_ids[0]), replace_text
            )
            write_dicom(ds, path)
            tokens[c.mrn] += [ds.AccessionNumber, ds.StudyInstanceUID, ds.SOPInstanceUID]
    for i, c in enumerate(canaries):
        if not tokens[c.mrn]:
            ds = pydicom.dcmread(spare)
            uid = f"1.2.826.0.1.3680043.8.498.4417.{i}"
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, f"{uid}.1", f"{uid}.1.1"
            ds.AccessionNumber = f"CNRYACC{4417 + i}"
            _make_theirs(ds, c, c.encounter_ids[0], {})
            write_dicom(ds, batches[0] / IMAGING_FOLDER / f"canary_{i}.dcm")
            tokens[c.mrn] += [ds.AccessionNumber, uid, f"{uid}.1.1"]
    for b in batches:
        write_completion_marker(b)
    return [dataclasses.replace(c, dicom=tuple(tokens[c.mrn])) for c in canaries]


def _make_theirs(ds: pydicom.Dataset, c: Canary, encounter_id: str, replace_text: dict[str, str]) -> None:
    ds.PatientID = c.mrn
    ds.PatientName = f"{c.last_name}^{c.first_name}"
    ds.AdmissionID = encounter_id
    ds.StudyDescription = f"portable chest for {c.first_name} {c.last_name}, call {c.phone}"
    ds.PatientAddress = c.address
    ds.PatientTelephoneNumbers = c.phone
    ds.OtherPatientIDs = c.email
    ds.private_block(0x0011, "SYNTHETIC PACS", create=True).add_new(0x01, "LO", c.mrn)


def _scan_file(path: Path, needles: dict[str, str]) -> set[str]:
    """Names of the needles found in a file: cell values of Parquet (any column, as text), bytes elsewhere."""
    if path.suffix == ".parquet":
        df = pl.read_parquet(path)
        text = "\n".join(
            "\n".join(df[c].cast(pl.String, strict=False).drop_nulls().to_list())
            for c in df.columns
            if df[c].dtype != pl.Null and not isinstance(df[c].dtype, pl.List | pl.Struct)
        )
        return {name for name, v in needles.items() if v in text}
    raw = path.read_bytes()
    return {name for name, v in needles.items() if v.encode() in raw or v.encode("utf-16-le") in raw}


def _scan_tree(root: Path, needles: dict[str, str]) -> dict[str, set[str]]:
    hits = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            found = _scan_file(p, needles)
            if found:
                hits[str(p.relative_to(root))] = found
    return hits


@dataclass(frozen=True)
class CanaryRun:
    data_root: Path
    needles: dict[str, str]
    event_log_text: str
    instance_files: int
    instance_hits: dict[str, set[str]]
    dicom_released: int


@pytest.fixture(scope="module")
def canary_run(tmp_path_factory: pytest.TempPathFactory) -> CanaryRun:
    from clinical_ml.defs.build import build_definitions
    from clinical_ml.resources.settings import AnonymizationSettings, EvaluationSettings

    root = tmp_path_factory.mktemp("canary_root")
    # one use case keeps the run short; the boundary does not depend on how many branches read below it
    cases = tmp_path_factory.mktemp("canary_usecases")
    shutil.copy(PROJECT_ROOT / "usecases" / "icu_mortality_24h.yaml", cases)
    generate_hospital(root / "landing", CONFIG)
    canaries, secret = _plant(root / "landing")
    needles = {f"{i}:{k}": v for i, c in enumerate(canaries) for k, v in c.tokens().items()}
    needles |= {f"coded:{field}": text for field, text in CODED_FIELD_CANARIES.items()}
    needles["column_header"] = HEADER_CANARY
    needles["hmac_secret"] = secret
    with pytest.MonkeyPatch.context() as mp, dg.instance_for_test() as instance:
        mp.setenv(SECRET_ENV_VAR, secret)
        defs = build_definitions(
            data_root=root,
            usecases_dir=cases,
            evaluation=EvaluationSettings(n_bootstrap=20, shap_max_rows=200),
            anonymization=AnonymizationSettings(pseudonym_mode="hmac", hmac_secret=dg.EnvVar(SECRET_ENV_VAR)),
        )
        batches = [b.batch_id for b in find_complete_batches(root / "landing")]
        assert len(batches) == CONFIG.n_batches
        instance.add_dynamic_partitions(BATCH_PARTITIONS_NAME, batches)
        run_ids = []
        for b in batches:
            res = defs.resolve_job_def("batch_ingestion_job").execute_in_process(
                instance=instance, partition_key=b
            )
            assert res.success
            run_ids.append(res.run_id)
        # A failing downstream step (another stage's bug) must not hide a leak in what the others wrote.
        res = defs.resolve_job_def("lifecycle_job").execute_in_process(
            instance=instance, raise_on_error=False
        )
        run_ids.append(res.run_id)
        # every record of the event log, metadata included, as the webserver would serve it
        event_log_text = "\n".join(dg.serialize_value(e) for rid in run_ids for e in instance.all_logs(rid))
        event_log_text += "\n".join(
            dg.serialize_value(r) for r in instance.get_runs()
        )  # run configs and tags
        _sensor_reports(instance, root, canaries[0].last_name)
        instance_root = Path(instance.root_directory)
        instance_files = [p for p in instance_root.rglob("*") if p.is_file()]
        instance_hits = _scan_tree(instance_root, needles)
    released = len(list((root / "deid" / IMAGING_FOLDER).rglob("*.dcm")))
    return CanaryRun(root, needles, event_log_text, len(instance_files), instance_hits, released)


def test_the_scanner_finds_the_canaries_where_they_are_allowed(canary_run):
    landing = _scan_tree(canary_run.data_root / "landing", canary_run.needles)
    found = set().union(*landing.values())
    identifiers = {k for k in canary_run.needles if k != "hmac_secret"}
    assert identifiers <= found, identifiers - found
    phi = _scan_tree(canary_run.data_root / "phi" / "raw", canary_run.needles)
    assert {k for k in identifiers if k.endswith(":mrn")} <= set().union(*phi.values())
    # the delivered text of the coded fields stays in the phi zone, where the data steward reads it
    assert {f"coded:{f}" for f in CODED_FIELD_CANARIES} <= set().union(*phi.values())
    unmapped = _scan_tree(canary_run.data_root / "phi" / "unmapped", canary_run.needles)
    assert {f"coded:{f}" for f in CODED_FIELD_CANARIES} <= set().union(*unmapped.values())
    imaging = {k: v for k, v in landing.items() if k.endswith(".dcm")}
    assert {k for k in identifiers if ":dicom_" in k} <= set().union(*imaging.values())
    assert {k for k in identifiers if k.endswith((":last_name", ":mrn", ":phone"))} <= set().union(
        *imaging.values()
    )


def _attributes_left(ds: pydicom.Dataset) -> set[str]:
    """Keywords of every attribute of a dataset, inside sequences too (the profile's own method codes aside);
    private attributes as ``private``."""
    out: set[str] = set()
    for elem in ds:
        out.add("private" if elem.tag.is_private else elem.keyword)
        if elem.VR == "SQ" and elem.keyword != "DeidentificationMethodCodeSequence":
            for item in elem.value:
                out |= _attributes_left(item)
    return out


def test_the_graph_released_the_canary_patients_dicom_files_de_identified(canary_run):
    """No tag that identifies a person survives: only allowlisted attributes, no private ones, the pseudonym
    as the patient's id and name, no birth date, every UID ours or a registered DICOM UID."""
    folder = canary_run.data_root / "deid" / IMAGING_FOLDER
    files = sorted(folder.rglob("*.dcm"))
    assert canary_run.dicom_released == len(files) > 0
    for path in files:
        ds = pydicom.dcmread(path)
        assert _attributes_left(ds) <= KEPT, _attributes_left(ds) - KEPT
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.PatientID == str(ds.PatientName) == path.parent.name  # the folder is the pseudonym
        assert not ds.get("PatientBirthDate") and not ds.get("AccessionNumber")
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            assert uid.startswith(UID_ROOT)
        assert path.name == f"{ds.SOPInstanceUID}.dcm"
    # the canary patients' own files went through the boundary (so the scan below looked at them)
    key = HmacKey(canary_run.needles["hmac_secret"].encode())
    mrns = pl.Series("mrn", [v for k, v in canary_run.needles.items() if k.endswith(":mrn")])
    subjects = keyed_mapping(mrns=mrns, encounter_ids=pl.Series([], dtype=pl.String), key=key).patients
    released = {p.parent.name for p in files}
    assert released & {str(s) for s in subjects["subject_id"].to_list()}
    events = pl.concat(
        [pl.read_parquet(p) for p in (canary_run.data_root / "deid" / "events").glob("*.parquet")]
    )
    assert events.filter(pl.col("code").str.starts_with("IMAGING//")).height > 0


def test_the_coded_fields_left_as_unmapped_and_were_counted(canary_run):
    frames = [pl.read_parquet(p) for p in (canary_run.data_root / "deid" / "encounters").glob("*.parquet")]
    enc = pl.concat(frames)
    for field in CODED_FIELD_CANARIES:
        assert (enc[field] == "unmapped").sum() > 0, field
    assert (enc["unit_type"] == "unmapped").sum() == (enc["unit"] == "unmapped").sum()
    assert "unmapped:discharge_disposition" in canary_run.event_log_text


def _sensor_reports(instance: dg.DagsterInstance, root: Path, name: str) -> None:
    """The landing sensor forced to report (limit 0) on a folder whose marker lists a file named after a
    patient that is not there: what it writes must name counts, never the file."""
    from clinical_ml.defs.ingestion.sensors import landing_sensor
    from clinical_ml.resources.zones import DataZones

    stuck = root / "landing" / "2027-01-01"
    stuck.mkdir()
    (stuck / "_SUCCESS").write_text(json.dumps({"files": {f"{name}_chart.csv": {"bytes": 10}}}))
    context = dg.build_sensor_context(
        instance=instance, resources={"zones": DataZones(root=str(root), stuck_batch_seconds=0)}
    )
    landing_sensor(context)
    shutil.rmtree(stuck)


def test_no_canary_in_the_alerts_the_sensors_write(canary_run):
    alerts = (canary_run.data_root / "alerts" / "alerts.jsonl").read_text()
    assert "listed_file_missing" in alerts  # the sensor did report the stuck folder
    assert {name for name, v in canary_run.needles.items() if v in alerts} == set()


@pytest.mark.parametrize("zone", BELOW_BOUNDARY)
def test_no_canary_in_any_file_below_the_boundary(canary_run, zone):
    root = canary_run.data_root / zone
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files, f"the graph wrote nothing into {zone}"
    assert _scan_tree(root, canary_run.needles) == {}


def test_no_canary_or_secret_in_the_event_log_metadata(canary_run):
    assert "anonymized_encounters" in canary_run.event_log_text  # the log was read
    hits = {name for name, v in canary_run.needles.items() if v in canary_run.event_log_text}
    assert hits == set()


def test_no_canary_in_the_dagster_instance_files(canary_run):
    """The event log database, compute logs and run storage of the instance that ran the graph."""
    assert canary_run.instance_files > 0
    assert canary_run.instance_hits == {}


def test_the_hmac_mode_kept_no_vault_and_the_secret_is_nowhere_on_disk(canary_run):
    assert not (canary_run.data_root / "phi" / "vault").exists()
    every_zone = _scan_tree(canary_run.data_root, {"hmac_secret": canary_run.needles["hmac_secret"]})
    assert every_zone == {}
    assert os.environ.get(SECRET_ENV_VAR) != CANARY_SECRET  # the test did not leak its key to later tests
