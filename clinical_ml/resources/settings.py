"""Knobs of the stages that are not paths: anonymization and evaluation settings."""

import dagster as dg
from pydantic import Field


class AnonymizationSettings(dg.ConfigurableResource):
    """Knobs of the anonymization boundary."""

    max_shift_weeks: int = Field(
        default=52, description="Date shifts are drawn from +/- this many whole weeks."
    )
    k_anonymity_min: int = Field(
        default=5, description="Smallest equivalence class allowed over quasi-identifiers."
    )
    pseudonym_seed: int | None = Field(
        default=None,
        description="Seed for surrogate ids and date shifts, for reproducible tests only. Leave unset in use: "
        "surrogates then come from operating-system entropy and cannot be re-derived.",
    )


class EvaluationSettings(dg.ConfigurableResource):
    """How models are evaluated and promoted."""

    n_bootstrap: int = Field(default=500, description="Bootstrap replicates for 95% confidence intervals.")
    bootstrap_seed: int = Field(
        default=20261129, description="Seed of the bootstrap, so reports are reproducible."
    )
    auroc_non_inferiority_margin: float = Field(
        default=0.02,
        description="A challenger may be this much below the champion's AUROC and still be promoted.",
    )
    shap_max_rows: int = Field(
        default=2000, description="Validation rows explained with SHAP (sampled, seeded)."
    )
