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


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    challenger: str
    champion_before: str | None
    reasons: tuple[str, ...]

    def as_dict(self) -> dict:
        return {
            "promoted": self.promoted,
            "challenger": self.challenger,
            "champion_before": self.champion_before,
            "reasons": list(self.reasons),
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


def decide_promotion(
    challenger: dict,
    champion_card: dict | None,
    *,
    criteria: dict[str, float | tuple[float, float] | list[float]],
    auroc_margin: float = 0.02,
) -> tuple[bool, list[str]]:
    """Judge a challenger's metrics (each ``{"value", "lower", "upper"}``) against the use case minimums
    on the lower CI bound, and against the champion (non-inferior on AUROC within ``auroc_margin``)."""
    reasons: list[str] = []
    ok = True
    m = challenger["metrics"]
    checks = [
        ("auroc", "auroc_min", "AUROC"),
        ("sensitivity", "sensitivity_min", "sensitivity"),
        ("specificity", "specificity_min", "specificity"),
    ]
    for metric, key, words in checks:
        lo, minimum = m[metric]["lower"], float(criteria[key])  # type: ignore[arg-type]
        passed = lo >= minimum
        ok &= passed
        reasons.append(
            f"{words} lower 95% bound {lo:.3f} {'meets' if passed else 'is below'} the minimum {minimum:.2f}"
        )
    brier_max = float(criteria.get("brier_max", 1.0))  # type: ignore[arg-type]
    b = m["brier"]["upper"]
    ok &= b <= brier_max
    reasons.append(
        f"Brier score upper 95% bound {b:.3f} {'within' if b <= brier_max else 'above'} {brier_max:.2f}"
    )
    if champion_card is not None:
        champ = champion_card["metrics"]["auroc"]["value"]
        chal = m["auroc"]["value"]
        non_inferior = chal >= champ - auroc_margin
        ok &= non_inferior
        reasons.append(
            f"AUROC {chal:.3f} vs champion {champ:.3f}: "
            f"{'non-inferior' if non_inferior else 'inferior'} within a margin of {auroc_margin:.2f}"
        )
    else:
        reasons.append("no champion yet: the first model meeting every minimum becomes champion")
    return ok, reasons


def record_decision(root: Path, use_case: str, decision: PromotionDecision) -> None:
    """Append the decision to the log and, when promoted, move the champion pointer."""
    base = Path(root) / use_case
    base.mkdir(parents=True, exist_ok=True)
    entry = {"at": datetime.now(UTC).isoformat(), **decision.as_dict()}
    with (base / "decisions.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")
    if decision.promoted:
        _atomic_write(
            base / "champion.json", json.dumps({"version": decision.challenger, "since": entry["at"]})
        )
