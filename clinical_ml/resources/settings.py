"""Knobs of the stages that are not paths: anonymization and evaluation settings."""

import dagster as dg
from pydantic import Field

from clinical_ml.core.promotion import GateSettings


class AnonymizationSettings(dg.ConfigurableResource):
    """Knobs of the anonymization boundary.

    The HMAC secret is only ever given as ``dg.EnvVar("CLINICAL_ML_PSEUDONYM_KEY")`` (see
    :func:`clinical_ml.resources.pseudonym_secret.anonymization_settings_from_env`), so neither the run
    config nor the event log holds its value; there is no default secret.
    """

    max_shift_weeks: int = Field(
        default=52, description="Date shifts are drawn from +/- this many whole weeks."
    )
    k_anonymity_min: int = Field(
        default=5,
        description="Smallest number of people allowed in an equivalence class over the quasi-identifiers "
        "(age band, sex, race/ethnicity, ZIP3, admission quarter, payer); a blocking check gates release on it.",
    )
    age_bands: list[int] = Field(
        default=[0, 18, 45, 65, 80],
        description="Lower edges of the age bands used as a quasi-identifier (0-17, 18-44, ..., 80+).",
    )
    max_withheld_share: float = Field(
        default=0.05,
        description="Share of a batch's patients that suppression may withhold before the WARN check "
        "suppression_within_limit fails (suppression falls on rare groups: too much of it biases models).",
    )
    risk_scope: str = Field(
        default="cumulative",
        description="'cumulative': a batch's re-identification risk is counted over the cumulative release "
        "(its people and those of the batches released before it, ids sorted below it), so a rare group is "
        "kept once enough alike people are released; nothing released earlier is changed. 'batch': each batch "
        "on its own (stricter: it also defends against an attacker who knows in which delivery a stay arrived).",
    )
    race_remedy: str = Field(
        default="hold_back",
        description="What happens to a person still too easy to single out once ZIP3 and a rare payer are "
        "withheld. 'hold_back' (cumulative scope only): their race and ethnicity are kept and they are held "
        "back in the phi zone, released with a later delivery once enough people alike have been, so the "
        "race/ethnicity audit keeps them (their admissions reach the de-identified layer later: no batch "
        "prediction for them meanwhile). 'suppress': released now with race and ethnicity withheld (lost to "
        "that audit). Under risk_scope 'batch' race is always suppressed (nothing is held back). See max_holds.",
    )
    max_holds: int = Field(
        default=2,
        description="With race_remedy 'hold_back': how many deliveries (their own, then each later one) a "
        "person may be held back by before their race and ethnicity are withheld to release them, so that "
        "a person who stays rare is not held back for ever.",
    )
    max_hold_deliveries: int = Field(
        default=30,
        description="Under the cumulative scope: after this many deliveries a person still held back is "
        "withheld for good (no later batch judges them again), so each batch reads a bounded number of "
        "earlier deliveries however long the stream.",
    )
    races_kept: list[str] | None = Field(
        default=["White", "Black or African American", "Asian", "Unknown"],
        description="Race categories released as delivered; other categories are released as 'Other'. "
        "None keeps every category.",
    )
    pseudonym_mode: str = Field(
        default="vault",
        description="'vault': random surrogate ids, mapping in the phi-zone vault (HIPAA Safe Harbor). "
        "'hmac': keyed HMAC-SHA256 under hmac_secret (GDPR pseudonymisation).",
    )
    hmac_secret: str | None = Field(
        default=None,
        description="Secret key of the 'hmac' mode: set it only as dg.EnvVar('CLINICAL_ML_PSEUDONYM_KEY'), "
        "never as a literal. No default: the 'hmac' mode fails with a clear error without it.",
    )
    pseudonym_seed: int | None = Field(
        default=None,
        description="Seed for surrogate ids and date shifts, for reproducible tests only. Leave unset in use: "
        "surrogates then come from operating-system entropy and cannot be re-derived.",
    )


class EvaluationSettings(dg.ConfigurableResource):
    """How models are evaluated and promoted (the clinical margins themselves live in the use case)."""

    n_bootstrap: int = Field(default=500, description="Bootstrap replicates for 95% confidence intervals.")
    bootstrap_seed: int = Field(
        default=20261129, description="Seed of the bootstrap, so reports are reproducible."
    )
    auroc_non_inferiority_margin: float | None = Field(
        default=None,
        description="Overrides the use case's promotion.auroc_non_inferiority_margin when set: a challenger may "
        "be this much below the champion's AUROC (lower 95% bound of the paired difference) and be promoted.",
    )
    shap_max_rows: int = Field(
        default=2000, description="Validation rows explained with SHAP (sampled, seeded)."
    )
    latency_repeats: int = Field(
        default=300, description="One-patient scoring calls timed for the latency SLO of the promotion gate."
    )

    def gate_settings(self) -> GateSettings:
        return GateSettings(
            n_bootstrap=self.n_bootstrap,
            seed=self.bootstrap_seed,
            latency_repeats=self.latency_repeats,
            auroc_margin=self.auroc_non_inferiority_margin,
        )
