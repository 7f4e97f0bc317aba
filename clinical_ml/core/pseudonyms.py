"""Keyed pseudonyms (HMAC-SHA256), the GDPR-pseudonymisation alternative to the random-surrogate vault.

Two legal paths, one interface (see DESIGN.md):

* ``vault`` (default, HIPAA Safe Harbor): random surrogate ids, not derived from any identifier; the
  mapping lives only in the phi-zone vault (:func:`clinical_ml.core.anonymization.extend_vault`).
* ``hmac`` (GDPR pseudonymisation): ``subject_id``, ``hadm_id`` and the date shift are HMAC-SHA256 of the
  normalized identifier under a secret key kept outside the data (an environment variable read through
  ``dg.EnvVar``). No lookup table is needed: the same identifier always yields the same pseudonym, in
  any batch, from any source, as long as the key is the same. Never an unkeyed or salted hash: without
  the key nobody can recompute or test a guess.

The key is held in :class:`HmacKey`, whose ``repr`` never shows it; error messages name the environment
variable, never its value.
"""

import hashlib
import hmac
from dataclasses import dataclass, field

import numpy as np
import polars as pl

PSEUDONYM_MODES = ("vault", "hmac")
SECRET_ENV_VAR = "CLINICAL_ML_PSEUDONYM_KEY"
MIN_SECRET_BYTES = 32
# Domain separation: the same string never gives the same number as a patient, an encounter and a shift.
_DOMAINS = {"subject": b"clinical_ml/subject_id/v1\x00", "hadm": b"clinical_ml/hadm_id/v1\x00"}
_SHIFT_DOMAIN = b"clinical_ml/shift_weeks/v1\x00"
_ID_MASK = (1 << 62) - 1  # positive int64 with head room; collisions are checked, not assumed away


class PseudonymSecretError(ValueError):
    """The HMAC mode was asked for without a usable secret."""


@dataclass(frozen=True)
class HmacKey:
    """A secret for keyed pseudonyms. ``repr`` and ``str`` never show it.

    Parameters
    ----------
    secret
        At least ``MIN_SECRET_BYTES`` bytes (e.g. ``python -c "import secrets; print(secrets.token_hex(32))"``).
    """

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_SECRET_BYTES:
            raise PseudonymSecretError(
                f"the pseudonym secret in {SECRET_ENV_VAR} is too short: it needs at least {MIN_SECRET_BYTES} "
                'bytes; generate one with python -c "import secrets; print(secrets.token_hex(32))"'
            )

    @classmethod
    def from_setting(cls, secret: str | None) -> "HmacKey":
        """Build the key from a configured value, with a clear error when it is missing."""
        if secret is None or not secret.strip():
            raise PseudonymSecretError(
                f"pseudonym_mode 'hmac' needs a secret key and none is set: export {SECRET_ENV_VAR} (at least "
                f"{MIN_SECRET_BYTES} bytes, kept out of the repository) and configure "
                f'AnonymizationSettings(hmac_secret=dg.EnvVar("{SECRET_ENV_VAR}")). There is no default key.'
            )
        return cls(secret.strip().encode())


def normalize_identifier(expr: pl.Expr) -> pl.Expr:
    """The form of an MRN or encounter number that pseudonyms are keyed on: trimmed, upper case.

    So ``" mrn-001"`` from one source and ``"MRN-001"`` from another are the same patient.
    """
    return expr.cast(pl.String).str.strip_chars().str.to_uppercase()


def _digest_int(key: bytes, domain: bytes, value: str) -> int:
    return int.from_bytes(hmac.new(key, domain + value.encode(), hashlib.sha256).digest()[:8], "big")


def hmac_ids(values: pl.Series, *, key: HmacKey, kind: str) -> pl.Series:
    """Positive int64 pseudonyms, HMAC-SHA256 of each normalized value under ``key``.

    Parameters
    ----------
    values
        Identifiers (MRNs or encounter numbers), already normalized; nulls stay null.
    kind
        ``subject`` or ``hadm``: separates the two id spaces.

    Raises
    ------
    ValueError
        When two different identifiers would share one pseudonym (a 62-bit collision: practically never,
        but checked because a silent merge of two patients would be a clinical error).
    """
    domain = _DOMAINS[kind]
    out = [None if v is None else _digest_int(key.secret, domain, v) & _ID_MASK for v in values.to_list()]
    series = pl.Series(values.name, out, dtype=pl.Int64)
    distinct = pl.DataFrame({"v": values, "id": series}).drop_nulls().unique()
    if distinct["id"].n_unique() != distinct.height:
        raise ValueError(f"HMAC pseudonym collision among {kind} ids; rotate the key")
    return series


def hmac_shift_days(values: pl.Series, *, key: HmacKey, max_shift_weeks: int) -> pl.Series:
    """Per-patient date shift in days: a whole number of weeks in ``[-max, -1] U [1, max]``, keyed."""
    if max_shift_weeks < 1:
        raise ValueError("max_shift_weeks must be at least 1")
    digests = np.array(
        [_digest_int(key.secret, _SHIFT_DOMAIN, v) if v is not None else 0 for v in values.to_list()],
        dtype=np.uint64,
    )
    magnitude = (digests % np.uint64(max_shift_weeks)).astype(np.int64) + 1
    sign = np.where((digests >> np.uint64(32)) % np.uint64(2) == 0, -1, 1)
    days = pl.Series(values.name, (magnitude * sign * 7).astype(np.int32), dtype=pl.Int32)
    return days.set(values.is_null(), None) if values.null_count() else days
