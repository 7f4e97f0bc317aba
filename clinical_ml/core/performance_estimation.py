"""Performance of a deployed model before its labels arrive, from calibrated risks (NannyML's CBPE idea).

Assumptions: the risks are calibrated on the reference after isotonic recalibration, and the relation between
predictors and outcome has not changed (covariate shift only). A change of assay or of coding (concept shift)
breaks it: realised performance, once labels mature, is the judge
(:func:`clinical_ml.core.performance_monitoring.performance_by_period`).
"""

from dataclasses import dataclass

import numpy as np
from sklearn.isotonic import IsotonicRegression


@dataclass(frozen=True)
class ConfidenceBasedEstimator:
    """Expected AUROC and sensitivity from calibrated risks, without labels (after NannyML's CBPE).

    Fit an isotonic map from risk to observed outcome on a labelled reference; for a new batch, each
    admission counts as ``p`` of a death and ``1 - p`` of a survival, which gives an expected ROC curve.
    """

    calibrator: IsotonicRegression
    threshold: float

    @classmethod
    def fit(cls, risk: np.ndarray, y: np.ndarray, *, threshold: float) -> "ConfidenceBasedEstimator":
        iso = IsotonicRegression(y_min=1e-4, y_max=1 - 1e-4, out_of_bounds="clip")
        iso.fit(np.asarray(risk, np.float64), np.asarray(y, np.float64))
        return cls(iso, threshold)

    def calibrated(self, risk: np.ndarray) -> np.ndarray:
        return np.asarray(self.calibrator.predict(np.asarray(risk, np.float64)))

    def estimate(self, risk: np.ndarray) -> dict[str, float]:
        """Expected AUROC, sensitivity, specificity and prevalence of a batch."""
        r = np.asarray(risk, np.float64)
        if r.size == 0:
            return {"auroc": float("nan"), "sensitivity": float("nan"), "specificity": float("nan")}
        p = self.calibrated(r)
        # group tied risks: the ROC moves diagonally through ties (mid-rank convention)
        uniq, inv = np.unique(-r, return_inverse=True)
        pos = np.bincount(inv, weights=p, minlength=uniq.size)
        neg = np.bincount(inv, weights=1 - p, minlength=uniq.size)
        tpr = np.concatenate([[0.0], np.cumsum(pos)]) / max(pos.sum(), 1e-12)
        fpr = np.concatenate([[0.0], np.cumsum(neg)]) / max(neg.sum(), 1e-12)
        auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
        flag = r >= self.threshold
        return {
            "auroc": auc,
            "sensitivity": float(p[flag].sum() / max(p.sum(), 1e-12)),
            "specificity": float((1 - p)[~flag].sum() / max((1 - p).sum(), 1e-12)),
            "prevalence": float(p.mean()),
        }
