"""Would more data help? (issue #18 item 7): the curve and the sentence it prints."""

import numpy as np
import polars as pl

from clinical_ml.core.learning_curve import CurvePoint, LearningCurve, learning_curve, learning_curve_markdown
from clinical_ml_tests.core.test_operating_threshold import _frame, _model


def _point(fraction: float, auc: float, patients: int) -> CurvePoint:
    return CurvePoint(fraction, patients, patients, patients // 5, (auc, auc - 0.03, auc + 0.03), 1.0)


def test_the_curve_grows_nested_shares_and_is_judged_on_one_validation_cohort():
    frame = _frame(1500, signal=1.2, seed=11)
    curve = learning_curve(frame, _model(frame), seed=3)
    patients = [p.patients for p in curve.points]
    assert [p.fraction for p in curve.points] == [0.25, 0.5, 0.75, 1.0]
    assert patients == sorted(patients) and patients[-1] == frame.filter(pl.col("split") != "held_out").height
    assert curve.validation_rows == frame.filter(pl.col("split") == "held_out").height
    for p in curve.points:
        assert p.auroc[1] <= p.auroc[0] <= p.auroc[2]
    assert curve.points[-1].auroc[0] > 0.7  # a real signal is learnt
    assert LearningCurve.from_dict(curve.as_dict()) == curve
    assert curve.recommendation() in learning_curve_markdown(curve)


def test_the_sentence_says_rising_or_flat_as_the_numbers_do():
    rising = LearningCurve((_point(0.75, 0.70, 750), _point(1.0, 0.74, 1000)), 400, 60)
    flat = LearningCurve((_point(0.75, 0.800, 750), _point(1.0, 0.805, 1000)), 400, 60)
    assert "from 0.700 with 75% of the derivation cohort (750 patients) to 0.740 with all of it (1,000)" in (
        rising.recommendation()
    )
    assert rising.recommendation().endswith("still rising, so more data of the same kind would likely help.")
    assert "flat (a gain under 0.01)" in flat.recommendation() and "unlikely to help" in flat.recommendation()
    blank = CurvePoint(0.25, 10, 10, 0, (float("nan"),) * 3, float("nan"))
    assert "could not be drawn" in LearningCurve((blank, _point(1.0, 0.8, 100)), 50, 5).recommendation()
    assert np.isfinite(flat.points[-1].auroc[0])
