"""One typed owner per artifact: where each file of the zones lives and how it is read and written.

Assets, sensors, the command line and the benchmarks ask a store for an artifact (``store.evaluation.read()``,
``store.batch_predictions(batch).write(frame)``) instead of building paths and parsing dicts. Every file is
written atomically (a temporary file renamed into place) and readers list only committed files: names that
begin with a dot (the temporary files of a write in progress or of a killed process) are never read.
"""

import dataclasses
import hashlib
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, Self, TypeVar

import polars as pl

from clinical_ml.core.anonymization import Vault
from clinical_ml.core.features import CohortFlow, SplitInfo
from clinical_ml.core.learning_curve import LearningCurve
from clinical_ml.core.population_model import PopulationModelComparison
from clinical_ml.core.quality import QualityProfile
from clinical_ml.core.recalibration import RecalibrationOffer
from clinical_ml.core.registry import PromotionDecision, RegistryIntegrityError
from clinical_ml.core.storage import (
    ParquetCompression,
    atomic_write_bytes,
    committed,
    read_json,
    sha256_file,
    write_json,
    write_parquet,
)
from clinical_ml.core.time_to_prediction import PredictionTiming
from clinical_ml.core.training import ChallengerFit
from clinical_ml.core.validation import Evaluation, OperatingThreshold

LANDING_SOURCES = ("patients", "encounters", "labs", "vitals")
# report role -> plot file written by the evaluation assets
PERFORMANCE_PLOTS = {
    "roc": "roc",
    "calibration": "calibration",
    "decision": "decision_curve",
    "importance": "shap_importance",
}


class JsonCodec(Protocol):
    def as_dict(self) -> dict: ...

    @classmethod
    def from_dict(cls, d: dict) -> Self: ...


T = TypeVar("T", bound=JsonCodec)


@dataclass(frozen=True)
class ParquetFile:
    path: Path
    compression: ParquetCompression = "zstd"

    def exists(self) -> bool:
        return self.path.exists()

    def read(self, columns: list[str] | None = None) -> pl.DataFrame:
        return pl.read_parquet(self.path, columns=columns)

    def scan(self) -> pl.LazyFrame:
        return pl.scan_parquet(self.path)

    def write(self, frame: pl.DataFrame) -> Path:
        return write_parquet(frame, self.path, compression=self.compression)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class JsonFile(Generic[T]):
    """A JSON file holding one typed value (a frozen dataclass with ``as_dict``/``from_dict``)."""

    path: Path
    kind: type[T]

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> T:
        return self.kind.from_dict(read_json(self.path))

    def write(self, value: T) -> Path:
        return write_json(value.as_dict(), self.path)


@dataclass(frozen=True)
class ParquetParts:
    """One Parquet file per delivery batch in a folder."""

    folder: Path

    def part(self, batch_id: str) -> ParquetFile:
        return ParquetFile(self.folder / f"{batch_id}.parquet")

    def files(self) -> list[Path]:
        return committed(self.folder, ".parquet")

    def batch_ids(self) -> list[str]:
        return [p.name.removesuffix(".parquet") for p in self.files()]

    def data_versions(self, batch_ids: list[str]) -> dict[str, str]:
        """SHA-256 of each named part that exists (the data versions a model's lineage records)."""
        return {b: sha256_file(self.part(b).path) for b in batch_ids if self.part(b).exists()}

    def read_all(self, *, relaxed: bool = False) -> pl.DataFrame:
        """Every committed part in one frame (empty when there is none). ``relaxed``: parts whose columns
        differ are aligned (missing columns become null) instead of refused."""
        files = self.files()
        if not files:
            return pl.DataFrame()
        if relaxed:
            return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
        return pl.read_parquet(files)


@dataclass(frozen=True)
class JsonParts(Generic[T]):
    """One typed JSON file per delivery batch in a folder."""

    folder: Path
    kind: type[T]

    def part(self, batch_id: str) -> JsonFile[T]:
        return JsonFile(self.folder / f"{batch_id}.json", self.kind)

    def read_all(self) -> list[T]:
        return [self.kind.from_dict(read_json(p)) for p in committed(self.folder, ".json")]


@dataclass(frozen=True)
class DictRecord:
    """A JSON record whose shape belongs to another module (a privacy record, a fairness summary)."""

    data: dict

    def as_dict(self) -> dict:
        return self.data

    @classmethod
    def from_dict(cls, d: dict) -> "DictRecord":
        return cls(d)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]


@dataclass(frozen=True)
class FairnessSummary:
    """What the subcohort fairness report found, as the report card reads it back."""

    model_version: str
    verdict: str
    details: dict  # clinical_ml.core.fairness.analysis_summary

    def as_dict(self) -> dict:
        return {**self.details, "model_version": self.model_version, "verdict": self.verdict}

    @classmethod
    def from_dict(cls, d: dict) -> "FairnessSummary":
        return cls(str(d["model_version"]), str(d["verdict"]), dict(d))


RELEASED_LEVELS = ("ok", "warn")


@dataclass(frozen=True)
class DriftRecord:
    """What a batch's drift check decided, kept beside the batch (the judge of its release)."""

    batch_id: str
    level: str
    retraining_requested: bool
    retraining_note: str
    reference: str
    model_version: str
    thresholds: dict
    check: dict = field(default_factory=dict)  # clinical_ml.core.batch_monitoring.BatchMonitoring.as_dict()

    @property
    def released(self) -> bool:
        return self.level in RELEASED_LEVELS

    def as_dict(self) -> dict:
        return {
            **self.check,
            "batch_id": self.batch_id,
            "level": self.level,
            "retraining_requested": self.retraining_requested,
            "retraining_note": self.retraining_note,
            "reference": self.reference,
            "model_version": self.model_version,
            "thresholds": self.thresholds,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DriftRecord":
        top = ("batch_id", "level", "retraining_requested", "retraining_note", "reference", "model_version")
        return cls(
            batch_id=str(d["batch_id"]),
            level=str(d["level"]),
            retraining_requested=bool(d.get("retraining_requested", False)),
            retraining_note=str(d.get("retraining_note", "")),
            reference=str(d.get("reference", "")),
            model_version=str(d.get("model_version", "")),
            thresholds=dict(d.get("thresholds", {})),
            check={k: v for k, v in d.items() if k not in (*top, "thresholds")},
        )


@dataclass(frozen=True)
class FeatureDriftSnapshot:
    """Each predictor of the newest batch against the derivation cohort, as the feature drift report shows."""

    batch_id: str
    features: tuple[dict, ...]  # clinical_ml.core.drift.FeatureDrift.as_dict() with a readable ``label``

    def as_dict(self) -> dict:
        return {"batch_id": self.batch_id, "features": list(self.features)}

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureDriftSnapshot":
        return cls(str(d["batch_id"]), tuple(d["features"]))


@dataclass(frozen=True)
class ShapImportance:
    """Global SHAP importance of each predictor of a model version, most important first."""

    model_version: str
    importance: tuple[dict, ...]

    def as_dict(self) -> dict:
        return {"model_version": self.model_version, "importance": list(self.importance)}

    @classmethod
    def from_dict(cls, d: dict) -> "ShapImportance":
        return cls(str(d["model_version"]), tuple(d["importance"]))


@dataclass(frozen=True)
class ChallengerStore:
    """The challenger being judged: its LightGBM text and its fit, before it is registered."""

    folder: Path

    @property
    def fit(self) -> JsonFile[ChallengerFit]:
        return JsonFile(self.folder / "fit.json", ChallengerFit)

    def model_text(self) -> str:
        """The challenger's LightGBM text, checked against the sha256 written with it: a file changed or damaged
        since training raises :class:`RegistryIntegrityError` naming it, and never reaches LightGBM (which can
        abort the whole process on a damaged model). A challenger written before checksums is read as it is."""
        model, checksum = self.folder / "model.txt", self.folder / "model.txt.sha256"
        data = model.read_bytes()
        if checksum.exists() and checksum.read_text().strip() != hashlib.sha256(data).hexdigest():
            raise RegistryIntegrityError(
                f"{model} does not match the sha256 written with it (changed or damaged since training, or a "
                "training run was killed between the two): materialize risk_model again"
            )
        try:
            return data.decode()
        except UnicodeDecodeError as e:
            raise RegistryIntegrityError(f"{model} is not a text model (byte {e.start})") from None

    def model_sha256(self) -> str:
        """The model file's sha256: the same data, code and configuration give the same one."""
        return hashlib.sha256((self.folder / "model.txt").read_bytes()).hexdigest()

    def write(self, model_text: str, fit: ChallengerFit) -> None:
        data = model_text.encode()
        atomic_write_bytes(self.folder / "model.txt", data)
        atomic_write_bytes(self.folder / "model.txt.sha256", hashlib.sha256(data).hexdigest().encode())
        self.fit.write(fit)


# What a kept profile may be made of: numpy's arrays, dtypes and scalars, and the project's own dataclasses.
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
}


class UnexpectedPickleContent(RuntimeError):
    """A kept file names something a computed profile never holds: it was not written by this code."""


class _ProfileUnpickler(pickle.Unpickler):
    """``pickle.load`` calls whatever a file names; this one resolves only the globals a profile is made of
    (the "restricting globals" recipe of Python's pickle documentation), so a planted file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        if module.startswith("clinical_ml.core."):
            found = super().find_class(module, name)
            if isinstance(found, type) and dataclasses.is_dataclass(found):
                return found
        raise UnexpectedPickleContent(f"{module}.{name} is not part of a computed profile")


@dataclass(frozen=True)
class PickleCache:
    """A value computed once and kept (a drift reference profile); derived data only, never an input.

    Read back with :class:`_ProfileUnpickler`: numpy arrays and the project's dataclasses only. A file that
    names anything else is refused with an error that says which file (its path names a use case and a model
    version, no patient), never loaded and never silently rebuilt over.
    """

    path: Path

    def get_or_build(self, build: Callable[[], Any]) -> Any:
        if self.path.exists():
            with self.path.open("rb") as f:
                try:
                    return _ProfileUnpickler(f).load()
                except UnexpectedPickleContent as e:
                    raise UnexpectedPickleContent(
                        f"the kept profile {self.path} was not written by clinical_ml ({e}); "
                        "check who can write to this zone, then delete the file to rebuild it"
                    ) from None
        value = build()
        atomic_write_bytes(self.path, pickle.dumps(value))
        return value


class ReportFiles:
    """HTML reports and PNG plots of one use case in the reports zone."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def plot(self, name: str) -> Path:
        return self.folder / "plots" / f"{name}.png"

    def write_plot(self, name: str, png: bytes) -> Path:
        return atomic_write_bytes(self.plot(name), png)

    def read_plots(self, *names: str) -> dict[str, bytes]:
        """The named plots that exist, as PNG bytes."""
        return {n: self.plot(n).read_bytes() for n in names if self.plot(n).exists()}

    def performance_plots(self) -> dict[str, bytes]:
        """The validation plots under the names the performance report and report card place them."""
        return {role: self.plot(name).read_bytes() for role, name in PERFORMANCE_PLOTS.items()}

    def forest_plot_name(self, attribute: str) -> str:
        return f"forest_{attribute}"

    def forest_plots(self, attributes: Sequence[str]) -> dict[str, bytes]:
        """Sensitivity forest plots of the audited attributes that have one."""
        return {
            a: self.plot(self.forest_plot_name(a)).read_bytes()
            for a in attributes
            if self.plot(self.forest_plot_name(a)).exists()
        }

    def report(self, name: str, suffix: str = "html") -> Path:
        return self.folder / f"{name}.{suffix}"

    def report_cards(self) -> list[Path]:
        """The HTML report card of every model version, oldest first."""
        return [p for p in committed(self.folder, ".html") if p.name.startswith("report_card_")]

    def write_report(self, name: str, text: str, suffix: str = "html") -> Path:
        return atomic_write_bytes(self.report(name, suffix), text.encode("utf-8"))


class UseCaseStore:
    """Every artifact of one use case: de-identified tables in ``deid/usecases/<name>``, reports in
    ``reports/<name>``."""

    def __init__(self, deid_root: Path, reports_root: Path, name: str) -> None:
        self.name = name
        self.folder = Path(deid_root) / "usecases" / name
        self.reports = ReportFiles(Path(reports_root) / name)
        f = self.folder
        self.cohort = ParquetFile(f / "cohort.parquet")
        self.cohort_flow = JsonFile(f / "cohort_flow.json", CohortFlow)
        self.labels = ParquetFile(f / "labels.parquet")
        # read by every model step after it (training, evaluation, explanations, fairness, the learning
        # curve...): LZ4, decoded 2 to 3 times faster than zstd for about 1.5 times the bytes
        self.features = ParquetFile(f / "features.parquet", compression="lz4")
        self.feature_cache = f / "feature_cache"
        self.subject_splits = ParquetFile(f / "subject_splits.parquet")
        self.split_info = JsonFile(f / "split_info.json", SplitInfo)
        self.challenger = ChallengerStore(f / "challenger")
        self.validation_predictions = ParquetFile(f / "validation_predictions.parquet")
        self.threshold = JsonFile(f / "threshold.json", OperatingThreshold)
        self.evaluation = JsonFile(f / "evaluation.json", Evaluation)
        self.shap = JsonFile(f / "shap.json", ShapImportance)
        self.learning_curve = JsonFile(f / "learning_curve.json", LearningCurve)
        self.population_model = JsonFile(f / "population_model.json", PopulationModelComparison)
        # the latest recalibration offered (or not) for the champion (clinical_ml.core.champion_recalibration)
        self.recalibration = JsonFile(f / "recalibration.json", RecalibrationOffer)
        self.decision = JsonFile(f / "decision.json", PromotionDecision)
        self.fairness = JsonFile(f / "fairness.json", FairnessSummary)
        self.feature_drift = JsonFile(f / "feature_drift.json", FeatureDriftSnapshot)
        self.batch_predictions = ParquetParts(f / "predictions")
        self.drift_records = JsonParts(f / "monitoring", DriftRecord)
        # per batch: from its landing to its predictions (clinical_ml.core.time_to_prediction)
        self.prediction_timing = JsonParts(f / "timing", PredictionTiming)
        # clinicians' answers to the point-of-care cards, pseudonymised (clinical_ml.core.clinician_feedback)
        self.clinician_feedback = ParquetFile(f / "clinician_feedback.parquet")
        # the cards the service served, pseudonymised, and the calls it answered (core.served_predictions)
        self.served_predictions = ParquetFile(f / "served_predictions.parquet")
        self.service_requests = ParquetFile(f / "service_requests.parquet")
        self.fhir_exports = f / "fhir"

    def drift_reference_cache(self, key: str) -> PickleCache:
        return PickleCache(self.folder / "monitoring" / "reference" / f"{key}.pkl")

    def fhir_export(self, batch_id: str) -> Path:
        return self.fhir_exports / f"{batch_id}.ndjson"


class PhiStore:
    """The phi zone: raw cohorts per source and batch, the pseudonym vault, the EHR outbox."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.vault_patients = ParquetFile(self.root / "vault" / "patients.parquet")
        self.vault_encounters = ParquetFile(self.root / "vault" / "encounters.parquet")
        # the hospital's opt-out register (clinical_ml.core.consent): mrn, objected_on
        self.consent_register = self.root / "consent" / "opt_out.csv"
        # per released batch, who it holds back and which held-back people it released (core.holdback)
        self.held = ParquetParts(self.root / "held")

    def raw(self, source: str) -> ParquetParts:
        return ParquetParts(self.root / "raw" / source)

    def read_vault(self) -> Vault:
        """The pseudonym vault, empty before the first batch (or in HMAC mode, which keeps none)."""
        if not self.vault_patients.exists():
            return Vault.empty()
        return Vault(self.vault_patients.read(), self.vault_encounters.read())

    def write_vault(self, vault: Vault) -> None:
        # Encounters first: a batch draws its new patients' surrogates before its encounters'
        # (anonymization.extend_vault), so a run killed between the two files leaves the vault as before or
        # with the encounters only, and the rerun draws the same patient surrogates again. The other order
        # left the patients only, and the rerun gave the encounters other ids than an uninterrupted run.
        self.vault_encounters.write(vault.encounters)
        self.vault_patients.write(vault.patients)

    def ehr_outbox(self, use_case: str, batch_id: str) -> Path:
        return self.root / "outbox" / use_case / f"{batch_id}.ndjson"


class DeidStore:
    """The de-identified zone: anonymized tables per batch, privacy records, the MEDS export, use cases."""

    def __init__(self, root: Path, reports_root: Path) -> None:
        self.root = Path(root)
        self._reports_root = Path(reports_root)
        self.patients = ParquetParts(self.root / "patients")
        self.encounters = ParquetParts(self.root / "encounters")
        self.events = ParquetParts(self.root / "events")
        # de-identified DICOM files: imaging/<batch>/<subject_id>/<new SOP instance UID>.dcm
        self.imaging = self.root / "imaging"
        self.privacy = JsonParts(self.root / "privacy", DictRecord)
        # where each delivery's rows went (counts and reason codes: core.row_accounting.BatchAccount.as_dict)
        self.accounting = JsonParts(self.root / "accounting", DictRecord)
        # what the opt-out register kept back and withdrew at each batch's anonymization (counts only)
        self.consent = JsonParts(self.root / "consent", DictRecord)
        self.meds = self.root / "meds"
        self.meds_codes = ParquetFile(self.meds / "metadata" / "codes.parquet")
        # data quality profiles per batch (aggregates only) and their pages
        self.quality = JsonParts(self.root / "quality", QualityProfile)
        self.quality_reports = ReportFiles(self._reports_root / "quality")

    def table(self, name: str) -> ParquetParts:
        return {"patients": self.patients, "encounters": self.encounters, "events": self.events}[name]

    def meds_shards(self) -> list[Path]:
        return committed(self.meds / "data", ".parquet")

    def use_case(self, name: str) -> UseCaseStore:
        return UseCaseStore(self.root, self._reports_root, name)
