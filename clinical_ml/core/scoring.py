"""Scoring API used by batch assets and by any service: ``score(rows) -> risk, reasons, flags``."""

from dataclasses import dataclass, field

import numpy as np

from clinical_ml.core.explain import top_reasons
from clinical_ml.core.modeling import TrainedModel


@dataclass(frozen=True)
class Score:
    """One scored admission."""

    risk: float
    flagged: bool  # at or above the operating threshold
    reasons: list[dict] = field(default_factory=list)  # top contributing features in plain words
    flags: list[str] = field(default_factory=list)  # guardrail flags, e.g. "out_of_range:lactate__max_24h"


@dataclass(frozen=True)
class Scorer:
    """A registered model with what it needs to score: threshold and training ranges."""

    model: TrainedModel
    threshold: float
    training_ranges: dict[str, tuple[float, float]]

    def score(self, x: np.ndarray, *, n_reasons: int = 3) -> list[Score]:
        """Score rows of ``x`` (columns in ``model.feature_names`` order)."""
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        risk = self.model.predict(x)
        contrib = np.asarray(
            self.model.booster.predict(x, num_iteration=self.model.best_iteration, pred_contrib=True)
        )[:, :-1]
        names = self.model.feature_names
        lo = np.array([self.training_ranges.get(n, (-np.inf, np.inf))[0] for n in names], dtype=np.float64)
        hi = np.array([self.training_ranges.get(n, (-np.inf, np.inf))[1] for n in names], dtype=np.float64)
        out = []
        for i in range(x.shape[0]):
            row = x[i]
            outside = np.isfinite(row) & ((row < lo) | (row > hi))
            flags = [f"out_of_range:{names[j]}" for j in np.flatnonzero(outside)]
            out.append(
                Score(
                    risk=float(risk[i]),
                    flagged=bool(risk[i] >= self.threshold),
                    reasons=top_reasons(contrib[i], row, names, k=n_reasons),
                    flags=flags,
                )
            )
        return out
