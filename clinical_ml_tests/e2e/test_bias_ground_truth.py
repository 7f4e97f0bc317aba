"""Ground truth of the synthetic `bias` scenario: the injected group is flagged, with a CI excluding parity.

Runs the core lifecycle functions (no Dagster) on a hospital large enough for the group's interval to be
informative: about 430 validation admissions of the affected group.
"""

import numpy as np
import polars as pl
import pytest

from clinical_ml.core.anonymization import Vault, anonymize_batch
from clinical_ml.core.fairness import analysis_summary, subgroup_table, verdict
from clinical_ml.core.features import build_cohort, build_features, build_labels, patient_grouped_split
from clinical_ml.core.ingestion import ingest_file
from clinical_ml.core.population_model import compare_population_model
from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital
from clinical_ml.core.training import fit_model, training_frame
from clinical_ml.core.usecase import load_use_case
from clinical_ml.core.validation import operating_threshold, predict_frame
from clinical_ml_tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow
SOURCES = ("patients", "encounters", "labs", "vitals")


def test_bias_scenario_group_is_flagged_with_a_ci_excluding_parity(tmp_path):
    h = generate_hospital(tmp_path, SyntheticConfig(n_patients=8000, n_batches=3, seed=7, scenario="bias"))
    group = h.manifest["bias"]["group"]["race"]
    vault, pats, encs, evs = Vault.empty(), [], [], []
    for b in h.batch_ids:
        raw = {s: ingest_file(tmp_path / b / f"{s}.csv", s).accepted for s in SOURCES}
        out = anonymize_batch(**raw, vault=vault, batch_id=b, rng=np.random.default_rng(1))
        vault = out.vault
        pats.append(out.patients)
        encs.append(out.encounters)
        evs.append(out.events)
    uc = load_use_case(PROJECT_ROOT / "usecases" / "icu_mortality_24h.yaml")
    # with the events, as the graph builds it: the question is anchored at each stay's ICU admission event
    events = pl.concat(evs)
    cohort, _ = build_cohort(pl.concat(encs), pl.concat(pats), uc, events)
    feats = build_features(events, cohort, uc)
    splits = patient_grouped_split(cohort, validation_fraction=0.3, tuning_fraction=0.2, seed=1)
    frame = training_frame(feats, build_labels(cohort, uc), splits)
    model, _ = fit_model(frame, uc)
    preds = predict_frame(model, frame.filter(pl.col("split").is_in(["tuning", "held_out"])), cohort)
    threshold = operating_threshold(preds, uc)
    val = preds.filter(pl.col("split") == "held_out")
    analysis = subgroup_table(
        val["label"].cast(pl.Int8).to_numpy(),
        val["risk"].to_numpy(),
        threshold,
        {a: val[a].fill_null("Unknown").to_numpy() for a in ("sex", "race_ethnicity", "age_band")},
        intersections=False,
        n_boot=300,
        clusters=val["subject_id"].to_numpy(),
        observed_expected_range=uc.subgroups.observed_expected_range,
        calibration_slope_range=uc.subgroups.calibration_slope_range,
        words=uc.words,
    )
    row = next(r for r in analysis.rows if r.attribute == "race_ethnicity" and r.group == group)
    oe, lower, upper = row.metrics["observed_expected_ratio"]
    assert lower > 1.0 and oe > 1.0  # more deaths than predicted: the 95% CI excludes parity
    assert row.p_values["observed_expected_ratio"] < 0.05
    # the group's calibration is flagged in words: a failure when the whole interval lies above the
    # acceptable range, else more deaths than predicted relative to all patients beyond chance (Holm)
    low, high = uc.subgroups.observed_expected_range
    failure = (
        f"observed/expected deaths {oe:.2f} (95% CI {lower:.2f} to {upper:.2f}): more deaths than predicted, "
        f"the whole interval above the acceptable range {low:.2f} to {high:.2f}"
    )
    relative = f"more deaths than predicted, relative to all patients (O/E {oe:.2f} vs "
    calibration_flags = [f for f in row.flags if f == failure or f.startswith(relative)]
    assert calibration_flags
    assert (failure in row.failures) == (lower > high)
    v, reasons = verdict(
        analysis, min_events=uc.success_criteria.min_events, min_non_events=uc.success_criteria.min_non_events
    )
    assert v == "fail" if row.failures else v in ("fail", "review")
    assert all(f"race and ethnicity = {group}: {f}" in reasons for f in calibration_flags)
    others = [
        r
        for r in analysis.rows
        if r.attribute == "race_ethnicity" and r.group != group and not r.suppressed and r.n >= 200
    ]
    assert others, "the comparison needs other groups of adequate size"
    assert all(r.metrics["observed_expected_ratio"][1] <= 1.0 for r in others)
    assert not any(r.failures for r in others)
    # a population-specific model for the flagged group is better calibrated for it beyond chance (issue 18 item 7)
    attrs = ["sex", "race_ethnicity", "age_band"]
    comparison = compare_population_model(
        frame.join(cohort.select("hadm_id", "prediction_time", *attrs), on=["hadm_id", "prediction_time"]),
        model,
        analysis_summary(analysis, v, reasons, [], []),
        attributes=attrs,
        min_cell_size=uc.subgroups.min_cell_size,
        seed=1,
        n_boot=300,
        bootstrap_seed=1,
        model_version="v1",
    )
    assert (comparison.attribute, comparison.group) == ("race_ethnicity", group)
    assert any("calibration" in c.better() for c in comparison.candidates)
    assert comparison.recommendation().startswith(
        f"A population-specific model is better beyond chance for race and ethnicity = {group}"
    )
