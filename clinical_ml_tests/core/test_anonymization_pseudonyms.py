"""Keyed HMAC pseudonyms (GDPR mode) and where their secret comes from."""

import dagster as dg
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clinical_ml.core.anonymization import Vault, anonymize_batch
from clinical_ml.core.pseudonyms import (
    MIN_SECRET_BYTES,
    SECRET_ENV_VAR,
    HmacKey,
    PseudonymSecretError,
    hmac_ids,
    hmac_shift_days,
)
from clinical_ml.resources.pseudonym_secret import MODE_ENV_VAR, anonymization_settings_from_env, hmac_key_for
from clinical_ml.resources.settings import AnonymizationSettings
from clinical_ml_tests.core.test_anonymization import _people, raw_frames

SECRET = "k" * MIN_SECRET_BYTES + "-test-only"
OTHER_SECRET = "z" * MIN_SECRET_BYTES + "-test-only"


def _batch(first: int, n: int) -> dict[str, pl.DataFrame]:
    people = _people(
        [
            {"age_days": 20000 + i, "admit_min": 60 * i, "stay_h": 30, "lab_offsets_h": [2.0], "died": False}
            for i in range(n)
        ]
    )
    for i, p in enumerate(people):
        p["mrn"] = f"MRN{first + i:06d}"
    return raw_frames(people)


def test_the_same_key_gives_the_same_pseudonyms_in_every_batch_without_a_vault():
    key = HmacKey(SECRET.encode())
    a = anonymize_batch(**_batch(0, 4), vault=Vault.empty(), batch_id="b1", hmac_key=key)
    b = anonymize_batch(**_batch(2, 4), vault=Vault.empty(), batch_id="b2", hmac_key=key)
    assert not a.persist_vault and a.pseudonym_mode == "hmac"
    ida = dict(zip(a.vault.patients["mrn"], a.vault.patients["subject_id"], strict=True))
    idb = dict(zip(b.vault.patients["mrn"], b.vault.patients["subject_id"], strict=True))
    shared = set(ida) & set(idb)
    assert shared == {"MRN000002", "MRN000003"}
    assert all(ida[m] == idb[m] for m in shared)
    sa = dict(zip(a.vault.patients["mrn"], a.vault.patients["shift_days"], strict=True))
    sb = dict(zip(b.vault.patients["mrn"], b.vault.patients["shift_days"], strict=True))
    assert all(sa[m] == sb[m] for m in shared)


def test_another_key_gives_other_pseudonyms_and_no_output_holds_the_secret():
    raw = _batch(0, 5)
    a = anonymize_batch(**raw, vault=Vault.empty(), batch_id="b1", hmac_key=HmacKey(SECRET.encode()))
    b = anonymize_batch(**raw, vault=Vault.empty(), batch_id="b1", hmac_key=HmacKey(OTHER_SECRET.encode()))
    assert set(a.patients["subject_id"]).isdisjoint(set(b.patients["subject_id"]))
    for frame in (a.patients, a.encounters, a.events):
        for col in frame.columns:
            assert SECRET not in set(frame[col].cast(pl.String).drop_nulls().to_list())


def test_the_key_never_shows_in_repr_or_errors():
    key = HmacKey(SECRET.encode())
    assert SECRET not in repr(key) and SECRET not in str(key)
    with pytest.raises(PseudonymSecretError) as short:
        HmacKey(b"too-short-" + b"s3cr3t")
    assert "s3cr3t" not in str(short.value) and SECRET_ENV_VAR in str(short.value)


@pytest.mark.parametrize("missing", [None, "", "   "])
def test_hmac_mode_without_a_secret_fails_with_a_clear_error(missing):
    settings_ = AnonymizationSettings(pseudonym_mode="hmac", hmac_secret=missing)
    with pytest.raises(PseudonymSecretError, match=SECRET_ENV_VAR) as err:
        hmac_key_for(settings_)
    assert "no default" in str(err.value).lower()


def test_vault_mode_is_the_default_and_needs_no_secret():
    assert AnonymizationSettings().pseudonym_mode == "vault"
    assert AnonymizationSettings().hmac_secret is None
    assert hmac_key_for(AnonymizationSettings()) is None
    with pytest.raises(ValueError, match="pseudonym_mode"):
        hmac_key_for(AnonymizationSettings(pseudonym_mode="sha256"))


def test_settings_from_the_environment_wire_the_secret_as_an_env_var(monkeypatch):
    monkeypatch.setenv(MODE_ENV_VAR, "hmac")
    monkeypatch.setenv(SECRET_ENV_VAR, SECRET)
    s = anonymization_settings_from_env()
    assert s.pseudonym_mode == "hmac"
    assert isinstance(s.hmac_secret, dg.EnvVar) and s.hmac_secret == SECRET_ENV_VAR  # the name, not the value
    monkeypatch.setenv(MODE_ENV_VAR, "vault")
    assert anonymization_settings_from_env().hmac_secret is None
    monkeypatch.setenv(MODE_ENV_VAR, "md5")
    with pytest.raises(ValueError, match=MODE_ENV_VAR):
        anonymization_settings_from_env()


@settings(deadline=None, max_examples=50)
@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=50, unique=True), st.integers(1, 104))
def test_keyed_ids_are_positive_distinct_and_shifts_are_whole_nonzero_weeks(values, weeks):
    key = HmacKey(SECRET.encode())
    series = pl.Series("v", values)
    subject = hmac_ids(series, key=key, kind="subject")
    hadm = hmac_ids(series, key=key, kind="hadm")
    assert subject.dtype == pl.Int64 and (subject > 0).all() and subject.n_unique() == len(values)
    assert set(subject).isdisjoint(set(hadm))  # separate id spaces for patients and encounters
    shift = hmac_shift_days(series, key=key, max_shift_weeks=weeks)
    assert (shift % 7 == 0).all() and (shift != 0).all() and (shift.abs() <= 7 * weeks).all()
