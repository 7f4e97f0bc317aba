"""Recalibration as an action when the champion's calibration drifts: logistic recalibration (intercept and
slope) of the champion on recent admissions whose outcome is known, offered as a challenger through the same
promotion gate, registry and decision log as a retrained model.

What is recalibrated
--------------------
The champion's risk ``p`` becomes ``expit(a + b * logit(p))``, with ``a`` and ``b`` the maximum-likelihood
logistic regression of the outcome on ``logit(p)``, fitted on the admissions of the batches the champion
was not trained on whose outcome is known (mature). The change is written into the model itself: every
tree's leaf values are multiplied by ``b`` and ``a`` is added to the first tree's, so the recalibrated
model is an ordinary LightGBM text model that every scoring path (batch scoring, FHIR, the point-of-care
service, SHAP reasons) uses unchanged. With ``b > 0`` the map is increasing: the patients keep their order
(AUROC does not change) and the operating threshold moves with the risks, so the same patients are flagged.

When it is offered
------------------
:func:`monitored_calibration` judges the champion's calibration on those admissions by the monitoring rule
(observed/expected ratio and calibration slope with bootstrap 95% CIs; outside when the whole interval lies
outside the monitoring range). Only then, when no other model is before the panel or being promoted, and
when these admissions were not already offered for this champion, :func:`offer_recalibration` fits the
recalibration and judges it through the gate on the same admissions, each patient's risk recalibrated by a
fit that did not see the patient (5 folds of patients), so the gate's figures are not those of the data it
was fitted to. The recalibrated model never promotes itself: no subcohort analysis was run on it, so it
waits for the panel's sign-off (the report card it gets says what was done, on how many patients).
"""

import re
from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit

from clinical_ml.core.evaluation import calibration_slope_intercept
from clinical_ml.core.features import stable_uniform
from clinical_ml.core.monitoring_config import MonitoringConfig
from clinical_ml.core.performance_monitoring import metrics_with_ci

FOLDS = 5
"""Folds of patients of the recalibration's out-of-fold risk (the risk the gate judges)."""
_EPS = 1e-6
_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


@dataclass(frozen=True)
class Recalibration:
    """``expit(intercept + slope * logit(p))``."""

    intercept: float
    slope: float

    def apply(self, p: np.ndarray) -> np.ndarray:
        return np.asarray(expit(self.intercept + self.slope * _logit(p)))

    def one(self, p: float) -> float:
        """One risk (or threshold) recalibrated."""
        return float(self.apply(np.array([p]))[0])


def _logit(p: np.ndarray | float) -> np.ndarray:
    pc = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(pc / (1 - pc))


def fit_recalibration(y: np.ndarray, p: np.ndarray) -> Recalibration:
    """Maximum-likelihood logistic regression of ``y`` on ``logit(p)`` with an intercept.

    Newton-Raphson from the identity (intercept 0, slope 1), each step halved until the likelihood does not
    fall; deterministic.

    Raises
    ------
    ValueError
        One outcome class only, risks separating the outcomes (the fit does not exist), no convergence, or
        a slope that is not positive (the model ranks patients the wrong way round: recalibration cannot mend
        that).
    """
    y = np.asarray(y, dtype=np.float64)
    lp = _logit(p)
    if y.size == 0 or y.min() == y.max():
        raise ValueError("recalibration needs outcome events and non-events")
    if not np.isfinite(calibration_slope_intercept(y, p)[0]):
        raise ValueError("the risks separate the outcomes completely: no logistic recalibration exists")
    x = np.column_stack([np.ones_like(lp), lp])

    def loglik(beta: np.ndarray) -> float:
        eta = x @ beta
        return float(np.sum(y * eta - np.logaddexp(0.0, eta)))

    beta, ll = np.array([0.0, 1.0]), loglik(np.array([0.0, 1.0]))
    for _ in range(100):
        mu = expit(x @ beta)
        hessian = x.T @ (x * (mu * (1 - mu))[:, None])
        step = np.linalg.solve(hessian + 1e-12 * np.eye(2), x.T @ (y - mu))
        t = 1.0
        while loglik(beta + t * step) < ll - 1e-12 and t > 1e-10:
            t /= 2
        beta = beta + t * step
        ll = loglik(beta)
        if np.max(np.abs(t * step)) < 1e-10:
            break
    else:
        raise ValueError("the logistic recalibration did not converge")
    if not (np.all(np.isfinite(beta)) and beta[1] > 0):
        raise ValueError(
            f"the recalibration slope is {beta[1]:.3f}: the model ranks patients the wrong way round, which "
            "recalibration cannot mend (retrain instead)"
        )
    return Recalibration(float(beta[0]), float(beta[1]))


def recalibrated_model_text(text: str, recalibration: Recalibration) -> str:
    """The LightGBM text of a binary model whose risk is ``recalibration.apply`` of the original's.

    The raw score is the sum of the trees' leaf values and the risk ``expit(sigmoid * raw)``; each leaf (and
    internal node) value is multiplied by the slope and ``intercept / sigmoid`` is added to the first tree's,
    so the new raw score is ``slope * raw + intercept / sigmoid``. The trees' byte sizes in the header are
    recomputed (LightGBM reads the trees by them).

    Raises
    ------
    ValueError
        Not a binary LightGBM model with one tree per iteration.
    """
    start = text.find("\nTree=0\n")
    end = text.find("end of trees")
    objective = re.search(r"(?m)^objective=binary(?: sigmoid:([^\s]+))?$", text[:start])
    if start < 0 or end < 0 or objective is None or "\nnum_tree_per_iteration=1\n" not in text[:start]:
        raise ValueError("only a binary LightGBM text model with one tree per iteration can be recalibrated")
    sigmoid = float(objective.group(1) or 1.0)
    a, b = recalibration.intercept / sigmoid, recalibration.slope
    blocks = re.split(r"(?m)^(?=Tree=\d+$)", text[start + 1 : end])

    def values(line: str, shift: float) -> str:
        key, _, nums = line.partition("=")
        return key + "=" + " ".join(repr(b * float(v) + shift) for v in _FLOAT.findall(nums))

    out = []
    for i, block in enumerate(blk for blk in blocks if blk):
        shift = a if i == 0 else 0.0
        out.append(
            "\n".join(
                values(line, shift) if line.startswith(("leaf_value=", "internal_value=")) else line
                for line in block.split("\n")
            )
        )
    sizes = "tree_sizes=" + " ".join(str(len(blk.encode())) for blk in out)
    head = re.sub(r"(?m)^tree_sizes=.*$", sizes, text[: start + 1])
    return head + "".join(out) + text[end:]


def out_of_fold_recalibrations(
    y: np.ndarray, p: np.ndarray, subjects: np.ndarray, *, seed: int, folds: int = FOLDS
) -> tuple[Recalibration, ...]:
    """One recalibration per fold of patients (a seeded hash of the pseudonym), each fitted on the others."""
    fold = _fold(subjects, seed=seed, folds=folds)
    return tuple(fit_recalibration(y[fold != k], p[fold != k]) for k in range(folds))


def out_of_fold_risk(
    p: np.ndarray, subjects: np.ndarray, recalibrations: tuple[Recalibration, ...], *, seed: int
) -> np.ndarray:
    """Each row's risk recalibrated by the fit that did not see its patient."""
    fold = _fold(subjects, seed=seed, folds=len(recalibrations))
    out = np.empty(len(p))
    for k, r in enumerate(recalibrations):
        out[fold == k] = r.apply(p[fold == k])
    return out


def _fold(subjects: np.ndarray, *, seed: int, folds: int) -> np.ndarray:
    return np.minimum(
        (stable_uniform(np.asarray(subjects), seed=seed + 3) * folds).astype(np.int64), folds - 1
    )


@dataclass(frozen=True)
class CalibrationCheck:
    """The champion's calibration on recent admissions with known outcomes, judged by the monitoring rule."""

    observed_expected: dict[str, float]  # value, lower, upper
    calibration_slope: dict[str, float]
    oe_range: tuple[float, float]
    slope_range: tuple[float, float]

    @property
    def outside(self) -> list[str]:
        """Each measure whose whole 95% CI lies outside its range, in words."""
        out = []
        for words, m, (lo, hi) in (
            ("observed/expected ratio", self.observed_expected, self.oe_range),
            ("calibration slope", self.calibration_slope, self.slope_range),
        ):
            if m["lower"] > hi or m["upper"] < lo:
                out.append(
                    f"{words} {m['value']:.2f} (95% CI {m['lower']:.2f} to {m['upper']:.2f}), wholly "
                    f"{'above' if m['lower'] > hi else 'below'} the monitoring range {lo:g} to {hi:g}"
                )
        return out

    def as_dict(self) -> dict:
        return {**self.__dict__, "oe_range": list(self.oe_range), "slope_range": list(self.slope_range)}

    @classmethod
    def from_dict(cls, d: dict) -> "CalibrationCheck":
        return cls(
            d["observed_expected"], d["calibration_slope"], tuple(d["oe_range"]), tuple(d["slope_range"])
        )  # type: ignore[arg-type]


def monitored_calibration(
    y: np.ndarray, p: np.ndarray, *, threshold: float, config: MonitoringConfig
) -> CalibrationCheck:
    """O/E and calibration slope with bootstrap 95% CIs (the monitoring report's estimator and levels)."""
    m = metrics_with_ci(np.asarray(y, dtype=bool), p, threshold, n_boot=config.n_bootstrap, seed=0)
    return CalibrationCheck(
        m["observed_expected"], m["calibration_slope"], config.oe_range, config.calibration_slope_range
    )


@dataclass(frozen=True)
class RecalibrationOffer:
    """What the recalibration step decided for the champion, with the figures behind it (counts only).

    ``status``: ``offered`` (registered and judged by the gate), ``not needed`` (calibration within its
    range), ``not offered`` (nothing to recalibrate on, or another decision comes first), ``not possible``
    (the fit does not exist) or ``already offered`` (these admissions were offered for this champion)."""

    champion_version: str
    status: str
    reason: str
    fingerprint: str = ""
    challenger_version: str | None = None
    admissions: int = 0
    patients: int = 0
    events: int = 0
    batches: int = 0
    first_batch: str = ""
    last_batch: str = ""
    check: CalibrationCheck | None = None
    intercept: float | None = None
    slope: float | None = None
    threshold_before: float | None = None
    threshold_after: float | None = None
    before: dict = field(default_factory=dict)  # metric -> value, lower, upper (champion on these admissions)
    after: dict = field(default_factory=dict)  # the same for the out-of-fold recalibrated risk
    decision: dict | None = None
    group_thresholds: dict | None = None
    """The champion's approved per-group thresholds (``attribute``, ``before``) and where the recalibration
    moves them (``after``: the same patients of each group flagged); ``None`` when it had none."""

    def as_dict(self) -> dict:
        return {**self.__dict__, "check": self.check.as_dict() if self.check else None}

    @classmethod
    def from_dict(cls, d: dict) -> "RecalibrationOffer":
        return cls(**{**d, "check": CalibrationCheck.from_dict(d["check"]) if d.get("check") else None})

    def what(self, events_word: str = "outcome events") -> str:
        """What was recalibrated on which admissions, in words (counts and batch ids, no patient)."""
        if self.intercept is None or self.slope is None:
            return self.reason
        span = (
            self.first_batch
            if self.first_batch == self.last_batch
            else f"{self.first_batch} to {self.last_batch}"
        )
        return (
            f"Model {self.champion_version} recalibrated (intercept {self.intercept:+.3f}, slope {self.slope:.3f} "
            f"on the log-odds of its risk) on {self.admissions:,} admissions of {self.patients:,} patients "
            f"({self.events:,} {events_word}) whose outcome is known, from {self.batches} "
            f"batch{'es' if self.batches != 1 else ''} it was not trained on ({span})."
        )


def risk_examples(
    recal: Recalibration, risks: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)
) -> list[tuple[float, float]]:
    """(risk before, risk after) at a few risks, for the report."""
    return [(r, recal.one(r)) for r in risks]
