"""k-anonymity, prosecutor risk and the remedies that make a batch releasable."""

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clinical_ml.core.reidentification import (
    OTHER_RACE,
    QUASI_IDENTIFIERS,
    WITHHELD_ZIP3,
    RiskPolicy,
    age_band_expr,
    enforce_k_anonymity,
    measure_risk,
    quasi_identifiers,
    released_quasi_identifiers,
)

RACES = [
    "White",
    "Black or African American",
    "Asian",
    "Unknown",
    "Native Hawaiian or Other Pacific Islander",
]


def _release(rows: list[tuple]) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """rows: (subject_id, age, sex, race, ethnicity, zip3, period); one admission and two events each."""
    patients = pl.DataFrame(
        [{"subject_id": r[0], "sex": r[2], "race": r[3], "ethnicity": r[4], "zip3": r[5]} for r in rows],
        schema={
            "subject_id": pl.Int64,
            "sex": pl.String,
            "race": pl.String,
            "ethnicity": pl.String,
            "zip3": pl.String,
        },
    ).unique("subject_id", keep="first", maintain_order=True)
    encounters = pl.DataFrame(
        [{"subject_id": r[0], "age_years": r[1], "period": r[6]} for r in rows],
        schema={"subject_id": pl.Int64, "age_years": pl.Int32, "period": pl.String},
    )
    events = pl.DataFrame(
        {"subject_id": [r[0] for r in rows for _ in range(2)], "code": ["A", "B"] * len(rows)},
        schema={"subject_id": pl.Int64, "code": pl.String},
    )
    return patients, encounters, events


def test_classes_count_distinct_people_and_risk_is_one_over_the_smallest():
    rows = [(i, 50, "F", "White", "N", "021", "2026Q1") for i in range(6)]
    rows += [(100, 70, "M", "Asian", "N", "100", "2026Q1"), (100, 70, "M", "Asian", "N", "100", "2026Q1")]
    rows += [(101, 70, "M", "Asian", "N", "100", "2026Q1")]
    p, e, _ = _release(rows)
    r = measure_risk(quasi_identifiers(p, e, policy=RiskPolicy(k=5)), k=5)
    assert r.records == 9 and r.subjects == 8 and r.classes == 2
    assert r.k_min == 2  # two people in three admissions: a readmission is not a second person
    assert r.max_prosecutor_risk == pytest.approx(0.5)
    assert r.records_below_k == 3 and r.share_below_k == pytest.approx(3 / 9)
    assert not r.meets(5) and r.meets(2)


def test_an_empty_release_is_vacuously_safe():
    p, e, _ = _release([])
    r = measure_risk(quasi_identifiers(p, e, policy=RiskPolicy()), k=5)
    assert r.records == 0 and r.k_min is None and r.meets(5)


@given(st.integers(min_value=0, max_value=120))
def test_age_bands_contain_the_age(age):
    edges = (0, 18, 45, 65, 80)
    label = pl.select(age_band_expr(pl.lit(age), edges)).item()
    if label.endswith("+"):
        assert age >= int(label[:-1]) == edges[-1]
    else:
        lo, hi = map(int, label.split("-"))
        assert lo <= age <= hi and lo in edges


def test_policy_rejects_bad_bands_and_k():
    with pytest.raises(ValueError):
        RiskPolicy(age_bands=(18, 45))
    with pytest.raises(ValueError):
        RiskPolicy(age_bands=(0, 45, 18))
    with pytest.raises(ValueError):
        RiskPolicy(k=0)


def test_rare_races_are_generalized_then_zip_then_race_suppressed_and_counted():
    big = [(i, 50, "F", "White", "N", "021", "2026Q1") for i in range(10)]
    # Five people in one ZIP area the rest do not share: their ZIP is withheld, which joins them to 000.
    lonely_zip = [(20 + i, 50, "F", "White", "N", "606", "2026Q1") for i in range(2)]
    restricted = [(30 + i, 50, "F", "White", "N", WITHHELD_ZIP3, "2026Q1") for i in range(3)]
    rare = [
        (40 + i, 50, "F", "Native Hawaiian or Other Pacific Islander", "N", "021", "2026Q1") for i in range(5)
    ]
    p, e, ev = _release(big + lonely_zip + restricted + rare)
    out = enforce_k_anonymity(patients=p, encounters=e, events=ev, policy=RiskPolicy(k=5))
    assert out.race_generalized == 5
    assert set(out.patients.filter(pl.col("subject_id") >= 40)["race"]) == {OTHER_RACE}
    assert out.zip3_suppressed == 2 and set(
        out.patients.filter(pl.col("subject_id").is_between(20, 21))["zip3"]
    ) == {WITHHELD_ZIP3}
    assert out.subjects_withheld == 0 and out.after.meets(5) and out.after.k_min == 5
    assert not out.before.meets(5)


@settings(deadline=None, max_examples=60)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 120),
            st.sampled_from(["F", "M", "U"]),
            st.sampled_from(RACES),
            st.sampled_from(["N", "Hispanic or Latino", None]),
            st.sampled_from(["021", "024", "100", "606", "000", None]),
            st.sampled_from(["2026Q1", "2026Q2"]),
        ),
        max_size=120,
    ),
    st.integers(2, 8),
)
def test_after_remedies_every_class_holds_k_people_and_the_counts_add_up(people, k):
    rows = [(i, *p) for i, p in enumerate(people)]
    p, e, ev = _release(rows)
    policy = RiskPolicy(k=k)
    out = enforce_k_anonymity(patients=p, encounters=e, events=ev, policy=policy)
    # measured independently of the remedy code
    qi = quasi_identifiers(out.patients, out.encounters, policy=policy)
    sizes = qi.group_by(list(QUASI_IDENTIFIERS)).agg(pl.col("subject_id").n_unique())["subject_id"]
    assert (sizes >= k).all()
    assert out.after.meets(k)
    kept = set(out.patients["subject_id"])
    assert out.subjects_withheld == p.height - len(kept)
    assert out.admissions_withheld == e.height - out.encounters.height
    assert set(out.events["subject_id"]) <= kept and set(out.encounters["subject_id"]) <= kept
    assert out.events_withheld == ev.height - out.events.height == 2 * out.admissions_withheld
    # remedies only generalize or withhold: no value appears that was not delivered or a generalization
    assert set(out.patients["zip3"].drop_nulls()) <= set(p["zip3"].drop_nulls()) | {WITHHELD_ZIP3}
    assert set(out.patients["race"].drop_nulls()) <= set(RACES) | {OTHER_RACE}


def test_what_the_remedies_take_from_each_audited_group_is_counted_as_delivered():
    from clinical_ml.core.row_accounting import privacy_by_group

    white = [(i, 50, "F", "White", "N", "021", "2026Q1") for i in range(10)]
    # three Asian women of 50 cannot form a class of 5: their race is not released (step 2)
    asian = [(20 + i, 50, "F", "Asian", "N", "021", "2026Q1") for i in range(3)]
    # a lone man of 20 cannot be hidden even without race: withheld (step 3)
    lone = [(30, 20, "M", "White", "N", "021", "2026Q1")]
    # ... and join two women of 50 whose race was never known
    unknown = [(40 + i, 50, "F", None, "N", "021", "2026Q1") for i in range(2)]
    p, e, ev = _release(white + asian + lone + unknown)
    out = enforce_k_anonymity(patients=p, encounters=e, events=ev, policy=RiskPolicy(k=5))
    groups = out.audited_groups
    assert groups["race_ethnicity"]["Asian"] == {"patients": 3, "withheld": 0, "race_not_released": 3}
    assert groups["sex"]["M"]["withheld"] == 1 and groups["age_band"]["18-44"]["withheld"] == 1
    assert groups["race_ethnicity"]["Unknown"] == {"patients": 2, "withheld": 0, "race_not_released": 0}
    assert sum(g["patients"] for g in groups["sex"].values()) == 16

    rows = {(r["attribute"], r["group"]): r for r in privacy_by_group([{"audited_groups": groups}] * 2)}
    asian_row = rows[("race_ethnicity", "Asian")]
    assert asian_row["patients"] == 6 and asian_row["share_lost"] == 1.0 and asian_row["over_limit"]
    # race not released costs the race audit only: the women stay in the sex and age audits
    assert rows[("sex", "F")]["lost"] == 0 and not rows[("sex", "F")]["over_limit"]
    assert rows[("sex", "M")]["share_lost"] == 1.0
    assert privacy_by_group([{"batch_id": "old record without counts"}]) == []


def _with_payer(e: pl.DataFrame, payers: list[str | None]) -> pl.DataFrame:
    return e.with_columns(pl.Series("payer", payers, dtype=pl.String))


def test_a_group_too_small_in_one_delivery_is_kept_once_enough_alike_people_were_released_before():
    policy = RiskPolicy(k=5)
    alike = ("F", "Asian", "N", "021", "2026Q1")
    first = [(i, 50, *alike) for i in range(5)] + [
        (10 + i, 30, "M", "White", "N", "606", "2026Q1") for i in range(5)
    ]
    second = [(20, 52, *alike), (21, 60, *alike), (22, 31, "M", "White", "N", "606", "2026Q1")]
    p1, e1, ev1 = _release(first)
    out1 = enforce_k_anonymity(patients=p1, encounters=e1, events=ev1, policy=policy)
    assert out1.race_suppressed == out1.zip3_suppressed == out1.subjects_withheld == 0
    p2, e2, ev2 = _release(second)
    alone = enforce_k_anonymity(patients=p2, encounters=e2, events=ev2, policy=policy)
    assert alone.subjects_withheld == 3  # three people can never make a class of five on their own
    released = released_quasi_identifiers([(out1.patients, out1.encounters)], policy=policy)
    together = enforce_k_anonymity(patients=p2, encounters=e2, events=ev2, policy=policy, released=released)
    assert together.subjects_withheld == together.race_suppressed == together.zip3_suppressed == 0
    assert together.patients.equals(p2) and together.after.meets(5)
    # counted over the cumulative release: 5 released + 2 of this batch alike, and 5 + 1
    assert together.after.k_min == 6 and together.after.classes == 2


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.lists(
            st.tuples(
                st.integers(0, 200),  # the person: a returning patient appears in several batches
                st.integers(0, 100),
                st.sampled_from(["F", "M"]),
                st.sampled_from(RACES),
                st.sampled_from(["021", "606", None]),
                st.sampled_from(["2026Q1", "2026Q2"]),
                st.sampled_from(["Medicare", "Private", "Self-pay", None]),
            ),
            max_size=40,
        ),
        min_size=1,
        max_size=4,
    ),
    st.integers(2, 6),
)
def test_batches_released_one_after_another_keep_the_cumulative_release_k_anonymous(batches, k):
    """Whatever the deliveries (returning patients included), every class of everything released so far holds
    k people, though each batch remedies only its own records."""
    policy, published = RiskPolicy(k=k), []
    for batch in batches:
        rows = [(s, age, sex, race, "N", z, q) for s, age, sex, race, z, q, _ in batch]
        p, e, ev = _release(rows)
        e = _with_payer(e, [payer for *_, payer in batch])
        prior = released_quasi_identifiers(published, policy=policy)
        out = enforce_k_anonymity(patients=p, encounters=e, events=ev, policy=policy, released=prior)
        assert out.after.meets(k)
        published.append((out.patients, out.encounters))
    union = released_quasi_identifiers(published, policy=policy)
    # measured independently of the remedy code
    sizes = union.group_by(list(QUASI_IDENTIFIERS)).agg(pl.col("subject_id").n_unique())["subject_id"]
    assert (sizes >= k).all()
