"""Plain words for every statistical term the reports print, and which report uses which.

The base template prints the terms of the report being rendered at its end, so that a reader who meets
"equalized odds difference" or "-log10 p" finds what it means on the same page.
"""

TERMS: dict[str, str] = {
    "95% confidence interval (CI)": "the range of values compatible with the data; computed by resampling "
    "patients (bootstrap). A narrow interval means the estimate is precise; a wide one that more patients are "
    "needed before relying on it.",
    "Bootstrap": "repeating the calculation on many samples drawn with replacement from the same patients, to "
    "see how much a number would vary by chance.",
    "Derivation cohort": "the patients the model was fitted on (training and tuning set).",
    "Validation cohort": "patients kept apart and never used to fit the model (test set); every performance "
    "figure is computed on them.",
    "Operating threshold": "the predicted risk at or above which a patient is flagged.",
    "AUROC": "area under the ROC curve: the chance that a randomly chosen patient with the outcome is given a "
    "higher risk than a randomly chosen patient without it (0.5 = coin toss, 1 = perfect ranking).",
    "AUPRC": "area under the precision-recall curve: average positive predictive value across thresholds; "
    "compare it with how common the outcome is.",
    "Sensitivity": "among patients with the outcome, the share the model flags.",
    "Specificity": "among patients without the outcome, the share the model does not flag.",
    "Positive predictive value (PPV)": "among flagged patients, the share who have the outcome.",
    "Negative predictive value (NPV)": "among patients not flagged, the share who do not have the outcome.",
    "Brier score": "the mean squared difference between predicted risk and what happened (0 is perfect; "
    "lower is better).",
    "Calibration": "whether predicted risks match observed rates: of patients given 20% risk, about 20% should "
    "have the outcome.",
    "Calibration slope": "1 is ideal; below 1 means predictions are too extreme (too high for high-risk and too "
    "low for low-risk patients), above 1 that they are too modest.",
    "Calibration intercept": "0 is ideal; above 0 means risk is underestimated overall, below 0 overestimated.",
    "Observed / expected (O/E)": "the number of outcomes that happened divided by the number the model "
    "predicted (the sum of predicted risks); 1 is ideal, above 1 means the model underestimates risk.",
    "Decision curve (net benefit)": "the benefit of acting on the model's flags at each threshold, counting "
    "true alerts and subtracting false alerts weighted by the threshold, compared with treating everyone or "
    "no one.",
    "Number needed to evaluate": "how many flagged patients the team reviews to find one who has the outcome "
    "(1 / PPV).",
    "Mean |SHAP|": "mean absolute SHAP value: how much, on average, one input moves a patient's predicted risk "
    "up or down, in the model's log-odds units; larger means the input weighs more in the predictions.",
    "Equalized odds difference": "the largest gap between groups in the share of patients with the outcome "
    "who are flagged, or in the share of patients without it who are flagged; 0 means every group is flagged "
    "alike.",
    "Sensitivity minus all patients": "a group's sensitivity minus the sensitivity over all patients; negative "
    "means the group's patients with the outcome are missed more often.",
    "Holm correction": "a correction for testing many groups at once, so that a few differences by chance "
    "do not raise flags.",
    "Suppressed": "a group too small to judge (fewer patients or outcomes than the minimum cell size): no "
    "figures are shown, because they would be unreliable and could identify patients.",
    "p-value": "the probability of seeing a difference at least this large if nothing had changed; small "
    "values are evidence of a real change.",
    "Bonferroni correction": "dividing the significance level by the number of tests (m), so that testing "
    "many inputs at once does not produce false alarms.",
    "-log10 p": "the smallest p-value of a batch on a scale where larger is stronger evidence: 2 means "
    "p = 0.01, 3 means p = 0.001.",
    "PSI (population stability index)": "how differently the patients spread over the derivation cohort's "
    "tenths of an input's values; below 0.1 little change, 0.1 to 0.25 worth watching, above 0.25 large.",
    "KS (Kolmogorov-Smirnov)": "the largest gap between the cumulative shares of two groups of patients below "
    "any value (0 = same distribution, 1 = no overlap).",
    "Wasserstein distance": "how far values moved on average, in standard deviations of the derivation cohort.",
    "Jensen-Shannon distance": "how far apart two distributions are over the same bins (0 = same, 1 = no bin "
    "in common).",
    "Realised performance": "performance measured once the outcomes of scored patients are known.",
    "Label-free estimate": "performance estimated from the predicted risks alone, before outcomes are known; "
    "it assumes the model is still calibrated.",
}

# the terms each template uses, in the order a reader meets them
_COMMON = ["95% confidence interval (CI)", "Bootstrap", "Derivation cohort", "Validation cohort"]
_PERFORMANCE = [
    *_COMMON,
    "Operating threshold",
    "AUROC",
    "AUPRC",
    "Sensitivity",
    "Specificity",
    "Positive predictive value (PPV)",
    "Negative predictive value (NPV)",
    "Brier score",
    "Calibration",
    "Calibration slope",
    "Calibration intercept",
    "Observed / expected (O/E)",
    "Decision curve (net benefit)",
    "Number needed to evaluate",
    "Mean |SHAP|",
]
_SUBGROUPS = [
    "Equalized odds difference",
    "Sensitivity minus all patients",
    "Holm correction",
    "Suppressed",
]
_DRIFT = [
    "p-value",
    "Bonferroni correction",
    "PSI (population stability index)",
    "KS (Kolmogorov-Smirnov)",
    "Wasserstein distance",
    "Jensen-Shannon distance",
]
BY_TEMPLATE: dict[str, list[str]] = {
    "performance.html.j2": _PERFORMANCE,
    "report_card.html.j2": [*_PERFORMANCE, *_SUBGROUPS],
    "fairness.html.j2": [
        *_COMMON,
        "AUROC",
        "Sensitivity",
        "Specificity",
        "Positive predictive value (PPV)",
        "Negative predictive value (NPV)",
        "Observed / expected (O/E)",
        "Calibration slope",
        *_SUBGROUPS,
    ],
    "drift.html.j2": ["Derivation cohort", *_DRIFT],
    "monitoring.html.j2": [
        "Derivation cohort",
        "-log10 p",
        *_DRIFT[:3],
        "AUROC",
        "Realised performance",
        "Label-free estimate",
        "95% confidence interval (CI)",
    ],
}


def glossary_for(template: str) -> list[tuple[str, str]]:
    """(term, meaning) pairs for the report rendered from ``template`` (none for a template not listed)."""
    return [(t, TERMS[t]) for t in BY_TEMPLATE.get(template, [])]
