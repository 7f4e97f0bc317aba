"""Scoring API used by batch assets and by any service: ``score(rows) -> risk, reasons, flags``.

With a :class:`Guardrails` policy, a patient unlike the training data (too many values outside the
training ranges, or too much missing) is either scored with a warning or not scored at all (abstention,
with a reason code), so a clinician never reads a confident number the model has no basis for.
"""

import time
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import polars as pl

from clinical_ml.core.explain import top_reasons
from clinical_ml.core.modeling import TrainedModel

ABSTAIN_OUT_OF_RANGE = "ABSTAIN_OUT_OF_RANGE"
ABSTAIN_MISSINGNESS = "ABSTAIN_MISSINGNESS"
WARN_OUT_OF_RANGE = "WARN_OUT_OF_RANGE"
WARN_MISSINGNESS = "WARN_MISSINGNESS"
_NEVER_MISSING_AGGS = ("count", "missing")
_STATIC_PREFIXES = ("sex__", "admission_type__", "unit__")


@dataclass(frozen=True)
class Score:
    """One scored admission."""

    risk: float  # NaN when abstained
    flagged: bool  # at or above the operating threshold
    reasons: list[dict] = field(default_factory=list)  # top contributing features in plain words
    flags: list[str] = field(default_factory=list)  # guardrail flags, e.g. "out_of_range:lactate__max_24h"
    abstained: bool = False
    reason_code: str | None = None  # ABSTAIN_* when abstained, WARN_* when scored with a warning


@dataclass(frozen=True)
class Guardrails:
    """Scoring policy for inputs unlike the training data (mirrors the use case's ``guardrails``).

    Parameters
    ----------
    range_tolerance
        The training 1st-99th percentile range is widened by this share of its span on each side.
    max_out_of_range
        This many out-of-range features or more trigger the policy.
    max_missing_fraction
        A larger share of missing windowed values triggers the policy.
    policy
        ``warn``: score and attach a reason code; ``abstain``: no score, a reason code.
    """

    range_tolerance: float = 0.1
    max_out_of_range: int = 3
    max_missing_fraction: float = 0.5
    policy: str = "abstain"


def _nullable(name: str) -> bool:
    if "__" not in name or name.startswith(_STATIC_PREFIXES):
        return False
    agg = name.partition("__")[2].rpartition("_")[0]
    return agg not in _NEVER_MISSING_AGGS


@dataclass(frozen=True)
class Scorer:
    """A registered model with what it needs to score: threshold, training ranges, guardrail policy.

    ``guardrails=None`` keeps the original behaviour: every row is scored, range flags only.
    """

    model: TrainedModel
    threshold: float
    training_ranges: dict[str, tuple[float, float]]
    guardrails: Guardrails | None = None

    @cached_property
    def _bounds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tol = self.guardrails.range_tolerance if self.guardrails else 0.0
        names = self.model.feature_names
        lo = np.array([self.training_ranges.get(n, (-np.inf, np.inf))[0] for n in names], dtype=np.float64)
        hi = np.array([self.training_ranges.get(n, (-np.inf, np.inf))[1] for n in names], dtype=np.float64)
        lo = np.where(np.isfinite(lo), lo, -np.inf)
        hi = np.where(np.isfinite(hi), hi, np.inf)
        span = np.where(np.isfinite(hi - lo), hi - lo, 0.0)
        nullable = np.array([_nullable(n) for n in names], dtype=bool)
        return lo - tol * span, hi + tol * span, nullable

    def score(self, x: np.ndarray, *, n_reasons: int = 3) -> list[Score]:
        """Score rows of ``x`` (columns in ``model.feature_names`` order)."""
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        # one pass: SHAP contributions plus the bias sum to the log-odds, so risk needs no second predict
        # a few rows: one thread, as OpenMP start-up costs more than the trees (22 ms vs 1.5 ms measured
        # for one patient on a loaded 2-core machine)
        threads: dict[str, object] = {"num_threads": 1} if x.shape[0] <= 64 else {}
        raw = np.asarray(
            self.model.booster.predict(
                x,
                num_iteration=self.model.best_iteration,
                pred_contrib=True,
                **threads,  # type: ignore[arg-type]  # LightGBM passes extra keywords as parameters
            )
        )
        risk = 1.0 / (1.0 + np.exp(-raw.sum(axis=1)))
        contrib = raw[:, :-1]
        names = self.model.feature_names
        lo, hi, nullable = self._bounds
        outside_all = np.isfinite(x) & ((x < lo) | (x > hi))
        n_null = max(int(nullable.sum()), 1)
        missing_share = np.isnan(x[:, nullable]).sum(axis=1) / n_null
        g = self.guardrails
        out = []
        for i in range(x.shape[0]):
            outside = np.flatnonzero(outside_all[i])
            flags = [f"out_of_range:{names[j]}" for j in outside]
            code = None
            if g is not None:
                if missing_share[i] > g.max_missing_fraction:
                    flags.append(f"missing_fraction:{missing_share[i]:.2f}")
                    code = ABSTAIN_MISSINGNESS if g.policy == "abstain" else WARN_MISSINGNESS
                elif len(outside) >= g.max_out_of_range:
                    code = ABSTAIN_OUT_OF_RANGE if g.policy == "abstain" else WARN_OUT_OF_RANGE
            if code is not None and code.startswith("ABSTAIN"):
                out.append(Score(float("nan"), False, [], flags, True, code))
                continue
            out.append(
                Score(
                    risk=float(risk[i]),
                    flagged=bool(risk[i] >= self.threshold),
                    reasons=top_reasons(contrib[i], x[i], names, k=n_reasons),
                    flags=flags,
                    reason_code=code,
                )
            )
        return out


def score_rows(scorer: Scorer, rows: pl.DataFrame, *, n_reasons: int = 3) -> list[Score]:
    """``score(patient_rows)``: score feature rows (a frame with the model's feature columns, any order,
    as written by ``patient_features``); a column the model needs and the frame lacks counts as missing."""
    names = scorer.model.feature_names
    x = rows.select(
        [
            pl.col(n).cast(pl.Float64) if n in rows.columns else pl.lit(None, dtype=pl.Float64).alias(n)
            for n in names
        ]
    ).to_numpy()
    return scorer.score(x.astype(np.float64), n_reasons=n_reasons)


def abstention_rate(scores: list[Score]) -> float:
    """Share of rows the guardrail declined to score."""
    return float(np.mean([s.abstained for s in scores])) if scores else 0.0


def reason_code_counts(scores: list[Score]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in scores:
        if s.reason_code:
            out[s.reason_code] = out.get(s.reason_code, 0) + 1
    return out


def scoring_latency_ms(
    scorer: Scorer, x: np.ndarray, *, repeats: int = 200, warmup: int = 10, rounds: int = 3
) -> dict[str, float]:
    """Latency of scoring one patient with reasons, in process: p50 and p99 over ``repeats`` calls
    cycling through the rows of ``x``.

    ``p99_ms`` is wall-clock, the best of ``rounds`` rounds (a round disturbed by another process on a shared
    machine says little about the scorer); ``p99_cpu_ms`` is the scoring thread's CPU time, which other
    processes cannot inflate.
    """
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    for i in range(warmup):
        scorer.score(x[i % len(x)])
    p50, p99, cpu99 = [], [], []
    for _ in range(max(rounds, 1)):
        wall = np.empty(repeats)
        cpu = np.empty(repeats)
        for i in range(repeats):
            c0, t0 = time.thread_time(), time.perf_counter()
            scorer.score(x[i % len(x)])
            wall[i] = (time.perf_counter() - t0) * 1000.0
            cpu[i] = (time.thread_time() - c0) * 1000.0
        p50.append(float(np.percentile(wall, 50)))
        p99.append(float(np.percentile(wall, 99)))
        cpu99.append(float(np.percentile(cpu, 99)))
    return {
        "p50_ms": min(p50),
        "p99_ms": min(p99),
        "p99_cpu_ms": min(cpu99),
        "repeats": float(repeats),
        "rounds": float(max(rounds, 1)),
    }
