"""Knobs of the stages that are not paths: anonymization and evaluation settings."""

import dagster as dg
from pydantic import Field


class AnonymizationSettings(dg.ConfigurableResource):
    """Knobs of the anonymization boundary."""

    max_shift_weeks: int = Field(52, description="Date shifts are drawn from +/- this many whole weeks.")
    k_anonymity_min: int = Field(5, description="Smallest equivalence class allowed over quasi-identifiers.")


class EvaluationSettings(dg.ConfigurableResource):
    """How models are evaluated and promoted."""

    n_bootstrap: int = Field(500, description="Bootstrap replicates for 95% confidence intervals.")
    bootstrap_seed: int = Field(20261129, description="Seed of the bootstrap, so reports are reproducible.")
    auroc_non_inferiority_margin: float = Field(
        0.02, description="A challenger may be this much below the champion's AUROC and still be promoted."
    )
    shap_max_rows: int = Field(2000, description="Validation rows explained with SHAP (sampled, seeded).")
