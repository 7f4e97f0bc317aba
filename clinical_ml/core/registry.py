"""A file-based model registry: one folder per model version, a champion pointer per use case.

Layout under the registry zone::

    <use_case>/models/<version>/model.txt      LightGBM text format (never pickle)
    <use_case>/models/<version>/card.json      features, training ranges, metrics with CIs, lineage
    <use_case>/champion.json                   the version currently approved for use
    <use_case>/decisions.jsonl                 every promotion decision with its reasons
"""

import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

GATE_GROUPS = ("minimums", "non_inferiority", "subgroups", "latency")


@dataclass(frozen=True)
class GateCriterion:
    """One condition of the promotion gate and its outcome in words."""

    group: str  # one of GATE_GROUPS
    name: str
    passed: bool
    reason: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class GateResult:
    """Every criterion of the promotion gate; the challenger passes only if all pass."""

    criteria: tuple[GateCriterion, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.criteria)

    def group_passed(self, group: str) -> bool:
        return all(c.passed for c in self.criteria if c.group == group)

    def reasons(self, group: str | None = None) -> list[str]:
        return [c.reason for c in self.criteria if group is None or c.group == group]

    def as_dict(self) -> dict:
        return {"passed": self.passed, "criteria": [c.as_dict() for c in self.criteria]}

    @classmethod
    def from_dict(cls, d: dict) -> "GateResult":
        return cls(tuple(GateCriterion(**c) for c in d["criteria"]))


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    challenger: str
    champion_before: str | None
    reasons: tuple[str, ...]
    criteria: tuple[dict, ...] = ()

    def as_dict(self) -> dict:
        return {
            "promoted": self.promoted,
            "challenger": self.challenger,
            "champion_before": self.champion_before,
            "reasons": list(self.reasons),
            "criteria": list(self.criteria),
        }


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def new_version(now: datetime | None = None) -> str:
    """Sortable version id: UTC timestamp to the microsecond."""
    return (now or datetime.now(UTC)).strftime("v%Y%m%dT%H%M%S%fZ")


def register_model(root: Path, use_case: str, version: str, *, model_text: str, card: dict) -> Path:
    """Write a model version; an existing version is never overwritten."""
    d = Path(root) / use_case / "models" / version
    if d.exists():
        raise FileExistsError(f"model version {version} of {use_case} is already registered")
    d.mkdir(parents=True)
    (d / "model.txt").write_text(model_text)
    (d / "card.json").write_text(json.dumps(card, indent=2, default=str))
    return d


def read_card(root: Path, use_case: str, version: str) -> dict:
    return json.loads((Path(root) / use_case / "models" / version / "card.json").read_text())


def read_model_text(root: Path, use_case: str, version: str) -> str:
    return (Path(root) / use_case / "models" / version / "model.txt").read_text()


def champion(root: Path, use_case: str) -> str | None:
    p = Path(root) / use_case / "champion.json"
    return json.loads(p.read_text())["version"] if p.exists() else None


def _in_range(v: float, rng: tuple[float, float] | list[float]) -> bool:
    return bool(rng[0] <= v <= rng[1])


def minimum_criteria(metrics: dict, criteria: dict) -> list[GateCriterion]:
    """Absolute minimums of the use case: AUROC, sensitivity and specificity on the lower 95% bound, Brier
    on the upper bound; calibration slope (and intercept, observed/expected where set) point estimates in
    their ranges."""
    out = []
    for metric, key, words in (
        ("auroc", "auroc_min", "AUROC"),
        ("sensitivity", "sensitivity_min", "sensitivity"),
        ("specificity", "specificity_min", "specificity"),
    ):
        lo, minimum = metrics[metric]["lower"], float(criteria[key])
        ok = bool(lo >= minimum)
        out.append(
            GateCriterion(
                "minimums",
                f"{metric}_lower_bound",
                ok,
                f"{words} lower 95% bound {lo:.3f} {'meets' if ok else 'is below'} the minimum {minimum:.2f}",
            )
        )
    brier_max = float(criteria.get("brier_max", 1.0))
    b = metrics["brier"]["upper"]
    ok = bool(b <= brier_max)
    out.append(
        GateCriterion(
            "minimums",
            "brier_upper_bound",
            ok,
            f"Brier score upper 95% bound {b:.3f} {'within' if ok else 'above'} the maximum {brier_max:.2f}",
        )
    )
    for metric, key, words in (
        ("calibration_slope", "calibration_slope_range", "calibration slope"),
        ("calibration_intercept", "calibration_intercept_range", "calibration intercept"),
        ("observed_expected_ratio", "observed_expected_range", "observed/expected ratio"),
    ):
        rng = criteria.get(key)
        if rng is None:
            continue
        v = metrics[metric]["value"]
        ok = _in_range(v, rng)
        out.append(
            GateCriterion(
                "minimums",
                f"{metric}_in_range",
                ok,
                f"{words} {v:.2f} {'within' if ok else 'outside'} the range {rng[0]:g} to {rng[1]:g}",
            )
        )
    return out


def non_inferiority_criteria(
    challenger_metrics: dict,
    champion_card: dict | None,
    *,
    comparison: dict | None,
    auroc_margin: float,
    slope_margin: float = 0.1,
    intercept_margin: float = 0.1,
) -> list[GateCriterion]:
    """Non-inferiority to the champion.

    With ``comparison`` (:func:`clinical_ml.core.evaluation.paired_comparison` of both models on the same
    validation patients, each ``{"value", "lower", "upper"}``): the lower 95% bound of the AUROC difference
    must be above ``-auroc_margin`` and the calibration errors (|slope - 1|, |intercept|) may grow by at most
    their margins. Without it (the champion cannot score these rows), the champion card's own validation
    figures are compared, point to point.
    """
    if champion_card is None:
        return [
            GateCriterion(
                "non_inferiority",
                "no_champion",
                True,
                "no champion yet: the first model meeting every minimum becomes champion",
            )
        ]
    champ = champion_card.get("version", "champion")
    if comparison is not None:
        d = comparison["auroc_difference"]
        ok_auc = bool(d["lower"] >= -auroc_margin)
        sd = comparison["slope_error_difference"]["value"]
        idf = comparison["intercept_error_difference"]["value"]
        ok_i = bool(idf <= intercept_margin)
        return [
            GateCriterion(
                "non_inferiority",
                "auroc_non_inferior",
                ok_auc,
                f"AUROC difference vs champion {champ} on the same patients {d['value']:+.3f} "
                f"(95% CI {d['lower']:+.3f} to {d['upper']:+.3f}): "
                f"{'non-inferior' if ok_auc else 'not shown non-inferior'} within a margin of {auroc_margin:.2f}",
            ),
            _slope_criterion(sd, slope_margin),
            GateCriterion(
                "non_inferiority",
                "calibration_intercept_non_inferior",
                ok_i,
                f"calibration-in-the-large error {'changes' if ok_i else 'grows'} by {idf:+.3f} vs the champion "
                f"(margin {intercept_margin:.2f})",
            ),
        ]
    cm = champion_card["metrics"]
    chal, ref = challenger_metrics["auroc"]["value"], cm["auroc"]["value"]
    ok_auc = bool(chal >= ref - auroc_margin)
    out = [
        GateCriterion(
            "non_inferiority",
            "auroc_non_inferior",
            ok_auc,
            f"AUROC {chal:.3f} vs champion {ref:.3f} (each on its own validation cohort): "
            f"{'non-inferior' if ok_auc else 'inferior'} within a margin of {auroc_margin:.2f}",
        )
    ]
    if "calibration_slope" in cm and "calibration_slope" in challenger_metrics:
        sd = abs(challenger_metrics["calibration_slope"]["value"] - 1) - abs(
            cm["calibration_slope"]["value"] - 1
        )
        out.append(_slope_criterion(sd, slope_margin))
    return out


def _slope_criterion(slope_error_change: float, margin: float) -> GateCriterion:
    """The challenger's calibration slope error (|slope - 1|) may not grow by more than ``margin``."""
    ok = bool(slope_error_change <= margin)
    return GateCriterion(
        "non_inferiority",
        "calibration_slope_non_inferior",
        ok,
        f"calibration slope error {'changes' if ok else 'grows'} by {slope_error_change:+.3f} vs the champion "
        f"(margin {margin:.2f})",
    )


def subgroup_criteria(rows: list[dict], *, min_cell_size: int) -> list[GateCriterion]:
    """Subgroup minimums where groups are large enough.

    ``rows`` are subgroup rows (``attribute``, ``group``, ``n``, ``suppressed``, ``flags``) as produced by
    :func:`clinical_ml.core.fairness.subgroup_table`; a group fails when a flag says its CI lies wholly
    below a use-case minimum. Groups under ``min_cell_size`` (or without both outcomes) are not judged.
    """
    judged = [r for r in rows if r["attribute"] != "overall" and not r["suppressed"]]
    skipped = [r for r in rows if r["attribute"] != "overall" and r["suppressed"]]
    failing = [
        f"{r['attribute']} = {r['group']}: {f}" for r in judged for f in r["flags"] if "subgroup minimum" in f
    ]
    ok = not failing
    tail = f"; {len(skipped)} groups too small to judge (under {min_cell_size} or one outcome only)"
    return [
        GateCriterion(
            "subgroups",
            "subgroup_minimums",
            ok,
            (
                f"every one of {len(judged)} audited groups meets the subgroup minimums"
                if ok
                else f"{len(failing)} subgroup minimum(s) missed: " + "; ".join(failing)
            )
            + tail,
        )
    ]


def latency_criterion(
    p99_ms: float, *, slo_ms: float, wall_p99_ms: float | None = None
) -> list[GateCriterion]:
    """Scoring latency SLO: one patient scored with reasons, 99th percentile, in process.

    Judge the scorer's own time (CPU time of the scoring thread) so that a busy shared machine cannot refuse
    a model; the wall-clock p99, when given, is reported beside it.
    """
    ok = bool(p99_ms <= slo_ms)
    wall = f" (wall clock {wall_p99_ms:.2f} ms on this machine)" if wall_p99_ms is not None else ""
    return [
        GateCriterion(
            "latency",
            "scoring_latency_p99",
            ok,
            f"one-patient score with reasons p99 {p99_ms:.2f} ms {'within' if ok else 'above'} the SLO of "
            f"{slo_ms:g} ms{wall}",
        )
    ]


def evaluate_gate(*criteria_lists: list[GateCriterion]) -> GateResult:
    """Combine the gate's criteria (from the functions above) into one result."""
    return GateResult(tuple(c for lst in criteria_lists for c in lst))


def decide_promotion(
    challenger: dict,
    champion_card: dict | None,
    *,
    criteria: dict[str, float | tuple[float, float] | list[float]],
    auroc_margin: float = 0.02,
) -> tuple[bool, list[str]]:
    """Minimums and point non-inferiority only (kept for callers without subgroup or latency figures)."""
    gate = evaluate_gate(
        minimum_criteria(challenger["metrics"], dict(criteria)),
        non_inferiority_criteria(
            challenger["metrics"], champion_card, comparison=None, auroc_margin=auroc_margin
        ),
    )
    return gate.passed, gate.reasons()


def record_decision(
    root: Path, use_case: str, decision: PromotionDecision, *, move_pointer: bool = True
) -> None:
    """Append the decision to the log and, when promoted and ``move_pointer``, move the champion pointer.

    The Dagster graph records with ``move_pointer=False`` and moves the pointer in a separate step that
    runs only after the blocking gate checks pass (:func:`set_champion`).
    """
    base = Path(root) / use_case
    base.mkdir(parents=True, exist_ok=True)
    entry = {"at": datetime.now(UTC).isoformat(), **decision.as_dict()}
    with (base / "decisions.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")
    if decision.promoted and move_pointer:
        set_champion(root, use_case, decision.challenger)


def set_champion(root: Path, use_case: str, version: str) -> None:
    """Point the use case's champion at a registered version (atomic replace)."""
    if not (Path(root) / use_case / "models" / version / "model.txt").exists():
        raise FileNotFoundError(f"model version {version} of {use_case} is not registered")
    _atomic_write(
        Path(root) / use_case / "champion.json",
        json.dumps({"version": version, "since": datetime.now(UTC).isoformat()}),
    )


def decision_history(root: Path, use_case: str) -> list[dict]:
    """Every recorded decision, oldest first."""
    p = Path(root) / use_case / "decisions.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def registered_versions(root: Path, use_case: str) -> list[str]:
    d = Path(root) / use_case / "models"
    return sorted(p.name for p in d.iterdir() if (p / "card.json").exists()) if d.exists() else []


def refused_drift_retraining(root: Path, use_case: str) -> dict | None:
    """The newest model retrained because of drift, registered after the current champion and not promoted.

    While one exists, a drift ERROR of the same episode does not request retraining again: the gate has
    already judged a model trained on the drifted data and refused it; a person looks at the alert, and the
    nightly schedule retrains when newly labelled admissions arrive. Returns its card, or None.
    """
    champ = champion(root, use_case)
    champ_from = read_card(root, use_case, champ).get("drift_reference_from") if champ else None
    for version in reversed(registered_versions(root, use_case)):
        if champ is not None and version <= champ:
            return None
        card = read_card(root, use_case, version)
        episode = card.get("drift_reference_from")
        if episode and (champ_from is None or episode > champ_from):
            return card
    return None
