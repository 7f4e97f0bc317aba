"""Fuzzing the anonymization boundary (issue 17): small batches whose coded fields, identifiers, names and
headers hold hostile text (free text with a planted marker, odd unicode, empty strings, nulls) go through
``release_batch``, the entry point the anonymization asset calls. Nothing raises, and no planted text reaches
the frames as they would be released, nor the batch's privacy record, summary or log line. Bounded in examples so it runs in
seconds."""

from datetime import date, datetime, timedelta

import numpy as np
import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinical_ml.core.anonymization import Vault
from clinical_ml.core.deid_release import release_batch
from clinical_ml.core.reidentification import RiskPolicy
from clinical_ml_tests.core.test_anonymization import raw_frames

FUZZ = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure here is a bug, not bad luck
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MARK = "qzxv"  # in every planted value; in no vocabulary, code or number format
# k = 1: nothing is suppressed for being rare, so whatever crossed would be seen in the frames
POLICY = RiskPolicy(k=1, age_bands=(0, 18, 45, 65, 80), races_kept=None)
PATIENT_TEXT = ("sex", "race", "ethnicity", "first_name", "last_name", "address", "zip", "phone", "email")
ENCOUNTER_TEXT = ("admission_type", "unit", "site", "discharge_disposition", "payer")
# Text shapes that have fooled recoders and matchers: a vocabulary word with free text after it, case and
# whitespace variants, look-alike letters, combining marks, zero-width and bidi characters, line breaks.
_PLANTED = [
    "HOME with daughter {m}", "home {m}", " MICU {m} ", "SITE_A/{m}", "Ｈｏｍｅ {m}", "HOME\u200b{m}",
    "\u202e{m}", "e\u0301{m}", "{m}\nHOME", "{m}\r\n", "=HYPERLINK(\"{m}\")", "{m}" * 40, "Medicare {m}",
    "White {m}", "F {m}", "02139 {m}",
]  # fmt: skip
PLANTED = st.one_of(
    st.sampled_from(_PLANTED).map(lambda t: t.format(m=MARK)),
    st.text(max_size=6).map(lambda t: f"{t}{MARK}{t}"),
)
VALUE = st.one_of(PLANTED, st.sampled_from(["", " ", None, "\u00a0", "HOME", "MICU", "F", "unknown"]))


def _batch(draw: st.DrawFn) -> dict[str, pl.DataFrame]:
    n = draw(st.integers(1, 6))
    admit = datetime(2026, 1, 5, 8, 0)
    people = [
        {"mrn": f"MRN{i:06d}", "birth": date(1950 + 7 * i, 3, 1), "admit": admit + timedelta(hours=5 * i)}
        for i in range(n)
    ]
    raw = raw_frames(people)
    for table, columns in (("patients", PATIENT_TEXT), ("encounters", ENCOUNTER_TEXT)):
        frame = raw[table]
        for column in draw(
            st.lists(st.sampled_from(columns), min_size=1, max_size=len(columns), unique=True)
        ):
            values = draw(st.lists(VALUE, min_size=n, max_size=n))
            frame = frame.with_columns(pl.Series(column, values, dtype=pl.String))
        if draw(st.booleans()):  # a header with the marker (a patient's name as a column title)
            frame = frame.with_columns(pl.lit(draw(PLANTED)).alias(draw(PLANTED)))
        raw[table] = frame
    if draw(st.booleans()):  # a hostile identifier: an encounter id and its MRN with free text
        planted = draw(PLANTED)
        raw["encounters"] = raw["encounters"].with_columns(pl.lit(planted).alias("encounter_id"))
        raw["labs"] = raw["labs"].with_columns(pl.lit(planted).alias("encounter_id"))
    return raw


def _planted_in(value: object) -> bool:
    return MARK in str(value).casefold() or MARK in str(value).upper().casefold()


@FUZZ
@given(data=st.data())
def test_hostile_text_in_any_field_never_raises_and_never_crosses(data):
    raw = data.draw(st.composite(lambda draw: _batch(draw))())
    release = release_batch(
        raw,
        vault=Vault.empty(),
        batch_id="2026-01-05",
        policy=POLICY,
        max_shift_weeks=52,
        rng=np.random.default_rng(0),
        hmac_key=None,
    )
    for table, frame in release.frames.items():
        assert not any(_planted_in(c) for c in frame.columns), table
        for column, dtype in frame.schema.items():
            if dtype == pl.String:
                assert not any(_planted_in(v) for v in frame[column].drop_nulls().unique()), (table, column)
    assert not _planted_in(release.privacy_record()), "the privacy record echoes planted text"
    assert not _planted_in(release.summary) and not _planted_in(release.log_line())
