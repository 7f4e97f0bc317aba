"""The model registry: one folder per model version, a champion pointer and a decision log per use case.

:class:`Registry` is the only code that knows the registry's files. Layout under the registry zone::

    <use_case>/models/<version>/model.txt      LightGBM text format (never pickle)
    <use_case>/models/<version>/card.json      the model card: features, training ranges, metrics with CIs,
                                               the gate's verdict, lineage
    <use_case>/models/<version>/SHA256SUMS     sha256 of both, written last (in a hidden folder renamed
                                               into place: a version is there whole or not at all)
    <use_case>/champion.json                   the version currently approved for use
    <use_case>/decisions.jsonl                 every promotion decision with its reasons, one framed record
                                               (with the sha256 of its content) per line

Files are checked on load: a model file or card that no longer matches its sha256, or that cannot be read,
raises :class:`RegistryIntegrityError` naming the file; a torn or altered line of the decision log is left
in place, skipped and reported (:meth:`Registry.decision_log_problems`), and the next record starts on a line
of its own. Versions registered before the checksums existed read back unverified.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from clinical_ml.core.evaluation import MetricWithCI
from clinical_ml.core.features import SplitInfo
from clinical_ml.core.gate import GateResult
from clinical_ml.core.modeling import TrainedModel, is_complete_model_text, load_model
from clinical_ml.core.storage import atomic_write_bytes
from clinical_ml.core.training import ChallengerFit
from clinical_ml.core.usecase import UseCase
from clinical_ml.core.validation import Evaluation

MODEL_FILE = "model.txt"
CARD_FILE = "card.json"
SUMS_FILE = "SHA256SUMS"
CHAMPION_FILE = "champion.json"
DECISIONS_FILE = "decisions.jsonl"


class RegistryIntegrityError(RuntimeError):
    """A registry file is damaged or was changed after it was written (the message names it)."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _loads_in_a_child(text: str) -> bool:
    """Whether LightGBM loads ``text`` and predicts one row in a separate process. Some damaged models make
    LightGBM abort or crash the process that reads them instead of raising, so a model file that no sha256
    vouches for (a version registered before the checksums) is tried apart first."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _TRY_MODEL], input=text.encode(), capture_output=True, timeout=300
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


_TRY_MODEL = (
    "import sys, numpy, lightgbm; b = lightgbm.Booster(model_str=sys.stdin.read()); "
    "b.predict(numpy.zeros((1, b.num_feature())))"
)


def _same_record(a: "PromotionDecision", b: "PromotionDecision") -> bool:
    """The same decision as recorded in the log (JSON, so tuples and lists alike), whatever its time."""
    return json.loads(json.dumps(a.as_dict() | {"at": ""}, default=str)) == json.loads(
        json.dumps(b.as_dict() | {"at": ""}, default=str)
    )


def _record_digest(record: dict) -> str:
    return _sha256(json.dumps(record, sort_keys=True, default=str).encode())


@dataclass(frozen=True)
class Lineage:
    """Where a model came from: the batches and their data versions, the code, the use case, the run."""

    batch_ids: tuple[str, ...] = ()
    batch_data_versions: dict[str, str] = field(default_factory=dict)
    code_version: str = ""
    use_case_sha256: str = ""
    dagster_run_id: str = ""
    champion_at_training: str | None = None
    retraining_reason: str = ""

    def as_dict(self) -> dict:
        return {**self.__dict__, "batch_ids": list(self.batch_ids)}

    @classmethod
    def from_dict(cls, d: dict) -> "Lineage":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, "batch_ids": tuple(d.get("batch_ids", ()))})


@dataclass(frozen=True)
class ModelCard:
    """Everything registered with a model version besides the model itself.

    Cards written by older versions of the project may lack fields: they read back with empty defaults.
    """

    use_case: str
    version: str
    feature_names: tuple[str, ...] = ()
    training_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    fit: dict = field(default_factory=dict)
    threshold: float = 0.5
    metrics: dict[str, MetricWithCI] = field(default_factory=dict)
    n_validation: int = 0
    events_validation: int = 0
    validation: dict = field(default_factory=dict)
    guardrails: dict = field(default_factory=dict)
    gate: GateResult = field(default_factory=lambda: GateResult(()))
    paired_comparison: dict | None = None
    latency_ms: dict = field(default_factory=dict)
    abstention_rate_validation: float = 0.0
    reason_codes_validation: dict = field(default_factory=dict)
    lineage: Lineage = field(default_factory=Lineage)
    # where this model's drift reference starts: the batch of the drift episode it was retrained for, else
    # inherited from the champion it would replace (None: the whole derivation cohort)
    drift_reference_from: str | None = None

    def trained_on(self, batch_id: str) -> bool:
        return batch_id in self.lineage.batch_ids

    def metrics_dict(self) -> dict[str, dict[str, float]]:
        return {k: v.as_dict() for k, v in self.metrics.items()}

    def as_dict(self) -> dict:
        return {
            **self.__dict__,
            "feature_names": list(self.feature_names),
            "training_ranges": {k: list(v) for k, v in self.training_ranges.items()},
            "metrics": self.metrics_dict(),
            "gate": self.gate.as_dict(),
            "lineage": self.lineage.as_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict, *, use_case: str = "", version: str = "") -> "ModelCard":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(
            **{
                **known,
                "use_case": d.get("use_case", use_case),
                "version": d.get("version", version),
                "feature_names": tuple(d.get("feature_names", ())),
                "training_ranges": {
                    k: (float(v[0]), float(v[1])) for k, v in d.get("training_ranges", {}).items()
                },
                "metrics": {k: MetricWithCI(**v) for k, v in d.get("metrics", {}).items()},
                "gate": GateResult.from_dict(d["gate"]) if "gate" in d else GateResult(()),
                "lineage": Lineage.from_dict(d.get("lineage", {})),
            }
        )


@dataclass(frozen=True)
class PromotionDecision:
    """The champion/challenger decision with its reasons (one entry of the decision log)."""

    promoted: bool
    challenger: str
    champion_before: str | None
    reasons: tuple[str, ...]
    criteria: tuple[dict, ...] = ()
    at: str = ""  # when it was recorded (ISO 8601, UTC); empty until recorded
    awaiting_sign_off: bool = False
    """The gate passed and the model waits for the panel (``promotion.approval: panel``, or a fairness
    verdict other than pass under ``automatic``); not promoted until a sign-off approves it."""
    sign_off: dict | None = None
    """The panel's sign-off this decision records (:class:`clinical_ml.core.approval.SignOff`), else None."""

    def criteria_of(self, group: str) -> list[dict]:
        return [c for c in self.criteria if c["group"] == group]

    def as_dict(self) -> dict:
        return {
            "promoted": self.promoted,
            "challenger": self.challenger,
            "champion_before": self.champion_before,
            "reasons": list(self.reasons),
            "criteria": list(self.criteria),
            **({"at": self.at} if self.at else {}),
            **({"awaiting_sign_off": True} if self.awaiting_sign_off else {}),
            **({"sign_off": self.sign_off} if self.sign_off else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "PromotionDecision":
        return cls(
            promoted=bool(d["promoted"]),
            challenger=str(d["challenger"]),
            champion_before=d.get("champion_before"),
            reasons=tuple(d.get("reasons", ())),
            criteria=tuple(d.get("criteria", ())),
            at=str(d.get("at", "")),
            awaiting_sign_off=bool(d.get("awaiting_sign_off", False)),
            sign_off=d.get("sign_off"),
        )


def decision_for(gate: GateResult, *, challenger: str, champion_before: str | None) -> PromotionDecision:
    """The gate's verdict as a decision to record."""
    return PromotionDecision(
        gate.passed,
        challenger,
        champion_before,
        tuple(gate.reasons()),
        tuple(c.as_dict() for c in gate.criteria),
    )


def build_model_card(
    *,
    use_case: UseCase,
    fit: ChallengerFit,
    evaluation: Evaluation,
    split_info: SplitInfo,
    gate: GateResult,
    gate_figures: dict,
    lineage: Lineage,
    champion: "ModelCard | None",
    drift_from: str | None,
) -> ModelCard:
    """The card registered with a challenger. Its drift reference starts at the batch of the drift episode it
    was retrained for (``drift_from``), else where the champion's did (None: the whole derivation cohort)."""
    return ModelCard(
        use_case=use_case.name,
        version=fit.version,
        feature_names=fit.feature_names,
        training_ranges=fit.fit.training_ranges,
        fit={k: v for k, v in fit.fit.as_dict().items() if k != "training_ranges"},
        threshold=evaluation.threshold,
        metrics=dict(evaluation.metrics),
        n_validation=evaluation.n_validation,
        events_validation=evaluation.events_validation,
        validation=split_info.as_dict(),
        guardrails=use_case.guardrails.model_dump(),
        gate=gate,
        paired_comparison=gate_figures.get("paired_comparison"),
        latency_ms=gate_figures.get("latency_ms", {}),
        abstention_rate_validation=float(gate_figures.get("abstention_rate_validation", 0.0)),
        reason_codes_validation=gate_figures.get("reason_codes_validation", {}),
        lineage=lineage,
        drift_reference_from=drift_from or (champion.drift_reference_from if champion else None),
    )


def new_version(now: datetime | None = None) -> str:
    """Sortable version id: UTC timestamp to the microsecond."""
    return (now or datetime.now(UTC)).strftime("v%Y%m%dT%H%M%S%fZ")


class Registry:
    """The registry of one use case under the registry zone ``root``."""

    def __init__(self, root: Path, use_case: str) -> None:
        self.root = Path(root)
        self.use_case = use_case
        self._base = self.root / use_case

    def _version_dir(self, version: str) -> Path:
        return self._base / "models" / version

    def version_dir(self, version: str) -> Path:
        """The folder of a registered version (for files kept beside it, e.g. the signed report card)."""
        d = self._version_dir(version)
        if not d.is_dir():
            raise FileNotFoundError(f"model version {version} of {self.use_case} is not registered")
        return d

    def register(self, card: ModelCard, *, model_text: str) -> Path:
        """Write a model version; an existing version is never overwritten. The files are written in a hidden
        folder renamed into place once complete (checksums last), so a registration cut short leaves no
        version, and the next registration of that version clears what it left. Registering again a version
        that holds the same model (a run retried after a crash that followed the registration) keeps the
        version as it is; another model under the same version raises ``FileExistsError``."""
        d = self._version_dir(card.version)
        if d.exists():
            if (d / MODEL_FILE).is_file() and self._read_verified(
                card.version, MODEL_FILE
            ) == model_text.encode():
                return d
            raise FileExistsError(f"model version {card.version} of {self.use_case} is already registered")
        staging = d.with_name(f".{card.version}.partial")
        shutil.rmtree(staging, ignore_errors=True)  # left by a registration that was killed
        staging.mkdir(parents=True)
        files = {
            MODEL_FILE: model_text.encode(),
            CARD_FILE: json.dumps(card.as_dict(), indent=2, default=str).encode(),
        }
        for name, data in files.items():
            atomic_write_bytes(staging / name, data)
        sums = "".join(f"{_sha256(data)}  {name}\n" for name, data in files.items())
        atomic_write_bytes(staging / SUMS_FILE, sums.encode())
        os.rename(staging, d)
        return d

    def _where(self, version: str, name: str) -> str:
        return f"registry file {self.use_case}/models/{version}/{name}"

    def _read_verified(self, version: str, name: str) -> bytes:
        """A file of a version, checked against its recorded sha256 (unverified for older versions)."""
        d = self._version_dir(version)
        try:
            data = (d / name).read_bytes()
        except OSError as e:
            raise RegistryIntegrityError(
                f"{self._where(version, name)} cannot be read ({type(e).__name__})"
            ) from e
        sums = d / SUMS_FILE
        if sums.exists():
            expected: dict[str, str] = {}
            for line in sums.read_bytes().decode("utf-8", errors="replace").splitlines():
                digest, _, file_name = line.partition("  ")
                expected[file_name] = digest
            if expected.get(name) != _sha256(data):
                raise RegistryIntegrityError(
                    f"{self._where(version, name)} does not match the sha256 recorded at registration: it was "
                    "changed or damaged since; restore it from a backup, or retrain and register a new version"
                )
        return data

    def card(self, version: str) -> ModelCard:
        data = self._read_verified(version, CARD_FILE)
        try:
            raw = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise RegistryIntegrityError(f"{self._where(version, CARD_FILE)} is not valid JSON") from e
        try:
            return ModelCard.from_dict(raw, use_case=self.use_case, version=version)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise RegistryIntegrityError(f"{self._where(version, CARD_FILE)} is not a model card") from e

    def has_card(self, version: str) -> bool:
        return (self._version_dir(version) / CARD_FILE).exists()

    def model_text(self, version: str) -> str:
        return self._read_verified(version, MODEL_FILE).decode("utf-8", errors="replace")

    def model(self, version: str) -> TrainedModel:
        text = self.model_text(version)
        unverified = not (self._version_dir(version) / SUMS_FILE).exists()
        if unverified and is_complete_model_text(text) and not _loads_in_a_child(text):
            raise RegistryIntegrityError(
                f"{self._where(version, MODEL_FILE)} is not a readable LightGBM model (it has no recorded "
                "sha256 and failed to load on its own): restore it from a backup, or retrain"
            )
        try:
            return load_model(text)
        except Exception as e:  # LightGBM raises its own error types for an unreadable model
            raise RegistryIntegrityError(
                f"{self._where(version, MODEL_FILE)} is not a readable LightGBM model"
            ) from e

    def champion(self) -> str | None:
        p = self._base / CHAMPION_FILE
        if not p.exists():
            return None
        where = f"registry file {self.use_case}/{CHAMPION_FILE}"
        remedy = (
            "restore it from a backup, or delete it and approve a registered version (clinical-ml approve)"
        )
        try:
            version = json.loads(p.read_bytes())["version"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise RegistryIntegrityError(
                f"{where} is not a champion pointer ({type(e).__name__}): {remedy}"
            ) from e
        if not isinstance(version, str) or not version:
            raise RegistryIntegrityError(f"{where} does not name a version: {remedy}")
        return version

    def champion_card(self) -> ModelCard | None:
        version = self.champion()
        return self.card(version) if version else None

    def set_champion(self, version: str) -> None:
        """Point the use case's champion at a registered version (atomic replace)."""
        if not (self._version_dir(version) / MODEL_FILE).exists():
            raise FileNotFoundError(f"model version {version} of {self.use_case} is not registered")
        payload = {"version": version, "since": datetime.now(UTC).isoformat()}
        atomic_write_bytes(self._base / CHAMPION_FILE, json.dumps(payload).encode())

    def record_decision(self, decision: PromotionDecision, *, move_pointer: bool = True) -> PromotionDecision:
        """Append the decision to the log and, when promoted and ``move_pointer``, move the champion pointer.

        The Dagster graph records with ``move_pointer=False`` and moves the pointer in a separate step
        (``champion_model``, :meth:`set_champion`) only for a promoted decision. Returns the decision as
        recorded (with its time). The record is one line with the sha256 of its content, written in one
        append; after a torn last line the record starts on a new line, so the fragment never swallows it.

        The same decision as the last one recorded (all but its time: a step run again after a crash between
        this record and the pointer) is not appended twice; the pointer is still moved and the recorded one
        returned.
        """
        self._base.mkdir(parents=True, exist_ok=True)
        last = self.decisions()[-1:]
        if last and _same_record(last[0], decision):
            if decision.promoted and move_pointer:
                self.set_champion(decision.challenger)
            return last[0]
        entry = PromotionDecision(**{**decision.__dict__, "at": datetime.now(UTC).isoformat()})
        record = entry.as_dict()
        line = json.dumps({**record, "sha256": _record_digest(record)}) + "\n"
        path = self._base / DECISIONS_FILE
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = "\n" + line
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if decision.promoted and move_pointer:
            self.set_champion(decision.challenger)
        return entry

    def decision_log(self) -> tuple[list[PromotionDecision], list[str]]:
        """The readable decisions, oldest first, and where the unreadable lines are (no content), in one read."""
        p = self._base / DECISIONS_FILE
        if not p.exists():
            return [], []
        decisions, problems = [], []
        for number, line in enumerate(p.read_bytes().decode("utf-8", errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"registry file {self.use_case}/{DECISIONS_FILE} line {number}"
            try:
                raw = json.loads(line)
                digest = raw.pop("sha256", None)
                if digest is not None and digest != _record_digest(raw):
                    problems.append(f"{where}: does not match its sha256 (altered); skipped")
                    continue
                decisions.append(PromotionDecision.from_dict(raw))
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                problems.append(
                    f"{where}: not a whole decision record (torn by a crash?); kept in the file, skipped"
                )
        return decisions, problems

    def decisions(self) -> list[PromotionDecision]:
        """Every readable recorded decision, oldest first (see :meth:`decision_log_problems` for the others)."""
        return self.decision_log()[0]

    def decision_log_problems(self) -> list[str]:
        """Lines of the decision log that could not be read, with where they are (no content)."""
        return self.decision_log()[1]

    def versions(self) -> list[str]:
        """Registered versions, oldest first; a registration cut short (no checksums and a file missing) is
        not one."""
        d = self._base / "models"
        if not d.exists():
            return []
        return sorted(
            p.name
            for p in d.iterdir()
            if not p.name.startswith(".")
            and ((p / SUMS_FILE).exists() or ((p / CARD_FILE).exists() and (p / MODEL_FILE).exists()))
        )

    def newest_card(self) -> ModelCard | None:
        versions = self.versions()
        return self.card(versions[-1]) if versions else None

    def refused_drift_retraining(self) -> ModelCard | None:
        """The newest model retrained because of drift, registered after the current champion and not promoted.

        While one exists, a drift ERROR of the same episode does not request retraining again: the gate has
        already judged a model trained on the drifted data and refused it; a person looks at the alert, and
        the nightly schedule retrains when newly labelled admissions arrive.
        """
        champ = self.champion()
        champ_from = self.card(champ).drift_reference_from if champ else None
        for version in reversed(self.versions()):
            if champ is not None and version <= champ:
                return None
            card = self.card(version)
            episode = card.drift_reference_from
            if episode and (champ_from is None or episode > champ_from):
                return card
        return None
