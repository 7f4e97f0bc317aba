"""Where the HMAC pseudonym secret comes from: the environment, through ``dg.EnvVar``, nowhere else."""

import os

import dagster as dg

from clinical_ml.core.pseudonyms import PSEUDONYM_MODES, SECRET_ENV_VAR, HmacKey
from clinical_ml.resources.settings import AnonymizationSettings

MODE_ENV_VAR = "CLINICAL_ML_PSEUDONYM_MODE"


def anonymization_settings_from_env(**overrides: object) -> AnonymizationSettings:
    """Settings whose pseudonym mode comes from ``$CLINICAL_ML_PSEUDONYM_MODE`` (``vault`` by default).

    In ``hmac`` mode the secret is wired as ``dg.EnvVar("CLINICAL_ML_PSEUDONYM_KEY")``: Dagster resolves it
    when the run starts and records only the variable's name in the run config. A missing variable fails
    the run before any data is read.
    """
    mode = os.environ.get(MODE_ENV_VAR, "vault").strip().lower() or "vault"
    if mode not in PSEUDONYM_MODES:
        raise ValueError(f"{MODE_ENV_VAR} must be one of {PSEUDONYM_MODES}, got {mode!r}")
    if mode == "hmac":
        overrides.setdefault("hmac_secret", dg.EnvVar(SECRET_ENV_VAR))
    return AnonymizationSettings(pseudonym_mode=mode, **overrides)  # type: ignore[arg-type]


def hmac_key_for(settings: AnonymizationSettings) -> HmacKey | None:
    """The key of the configured mode: ``None`` in vault mode; a clear error in hmac mode without one."""
    if settings.pseudonym_mode not in PSEUDONYM_MODES:
        raise ValueError(f"pseudonym_mode must be one of {PSEUDONYM_MODES}, got {settings.pseudonym_mode!r}")
    if settings.pseudonym_mode == "vault":
        return None
    return HmacKey.from_setting(settings.hmac_secret)
