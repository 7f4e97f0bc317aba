"""Clinician feedback (issue 20 item 6): across the boundary as pseudonyms and codes only, then monitored
with small cells masked and a stated rising-override rule."""

import json
from html import unescape
from pathlib import Path

import polars as pl
import pytest

from clinical_ml.core.anonymization import Vault
from clinical_ml.core.clinician_feedback import (
    FEEDBACK_SCHEMA,
    NOT_RELEASED,
    feedback_markdown,
    feedback_monitoring,
    feedback_view,
    pseudonymise_feedback,
    read_json_lines,
    rising_override,
    wilson,
)
from clinical_ml.core.monitoring_config import MonitoringConfig
from clinical_ml.core.pseudonyms import HmacKey, hmac_ids
from clinical_ml.core.reports import monitoring_report
from clinical_ml.core.usecase import load_use_case
from clinical_ml_tests.conftest import PROJECT_ROOT

OFFERED = ("already-aware", "not-applicable", "data-wrong")
KEY = HmacKey(b"s" * 40)


def served(
    card: str, patient: str, encounter: str, *, risk: float = 0.4, band: str | None = "warning"
) -> dict:
    return {
        "card_uuid": card,
        "patient_id": patient,
        "encounter_id": encounter,
        "model_version": "v1",
        "risk": risk,
        "indicator": band,
        "served_at": "2026-03-02T08:00:00+00:00",
    }


def answer(
    card: str, outcome: str, reason: str | None = None, *, at: str = "2026-03-02T09:00:00+00:00"
) -> dict:
    return {
        "card_uuid": card,
        "outcome": outcome,
        "override_reason": reason,
        "user_comment": "Mr SMITHSON is fine, MRN-SECRET-1",
        "received_at": at,
    }


def vault(*pairs: tuple[str, int, str, int]) -> Vault:
    return Vault(
        pl.DataFrame(
            {
                "mrn": [p[0] for p in pairs],
                "subject_id": [p[1] for p in pairs],
                "shift_days": [7] * len(pairs),
            },
            schema={"mrn": pl.String, "subject_id": pl.Int64, "shift_days": pl.Int32},
        ),
        pl.DataFrame(
            {"encounter_id": [p[2] for p in pairs], "hadm_id": [p[3] for p in pairs]},
            schema={"encounter_id": pl.String, "hadm_id": pl.Int64},
        ),
    )


NO_ONE = pl.Series("mrn", [], dtype=pl.String)


def test_vault_pseudonyms_codes_only_and_nothing_identifying_crosses():
    preds = [served("c1", " mrn-secret-1", "enc-9"), served("c2", "MRN-2", "ENC-2", band=None)]
    answers = [answer("c1", "overridden", "data-wrong"), answer("c2", "accepted")]
    out = pseudonymise_feedback(
        preds,
        answers,
        offered_reasons=OFFERED,
        vault=vault(("MRN-SECRET-1", 11, "ENC-9", 99)),
        hmac_key=None,
        opted_out=NO_ONE,
    )
    f = out.frame
    assert f.schema == pl.Schema(FEEDBACK_SCHEMA)
    assert f.rows() == [
        (11, 99, "v1", "overridden", "data-wrong", 0.4, "warning", "2026Q1"),
        # the vault does not know MRN-2 yet: released without pseudonyms, still counted
        (None, None, "v1", "accepted", None, 0.4, None, "2026Q1"),
    ]
    assert (out.released, out.without_pseudonym, out.received) == (2, 1, 2)
    text = json.dumps(f.to_dicts()) + json.dumps(out.as_dict()) + out.sentence()
    for secret in ("SECRET", "SMITHSON", "ENC-", "c1", "09:00"):
        assert secret.lower() not in text.lower()


def test_hmac_mode_gives_the_boundarys_pseudonyms():
    out = pseudonymise_feedback(
        [served("c1", "mrn-1 ", "e-1")],
        [answer("c1", "accepted")],
        offered_reasons=OFFERED,
        vault=Vault.empty(),
        hmac_key=KEY,
        opted_out=NO_ONE,
    )
    assert (
        out.frame["subject_id"].to_list() == hmac_ids(pl.Series(["MRN-1"]), key=KEY, kind="subject").to_list()
    )
    assert out.frame["hadm_id"].to_list() == hmac_ids(pl.Series(["E-1"]), key=KEY, kind="hadm").to_list()


def test_reasons_not_offered_are_unmapped_and_objectors_unknown_cards_and_repeats_are_counted():
    preds = [served("c1", "A", "E1"), served("c2", "B", "E2"), served("c3", "C", "E3")]
    answers = [
        answer("c1", "overridden", "not_offered"),
        answer("c2", "overridden", "already-aware"),  # B objected: withheld
        answer("c3", "accepted", at="2026-03-02T09:00:00+00:00"),
        answer("c3", "overridden", "risk-disagree", at="2026-03-02T10:00:00+00:00"),  # the latest answer wins
        answer("nope", "accepted"),
    ]
    out = pseudonymise_feedback(
        preds, answers, offered_reasons=OFFERED, vault=Vault.empty(), hmac_key=KEY, opted_out=pl.Series(["B"])
    )
    assert out.frame.select("outcome", "override_reason").rows() == [
        ("overridden", "unmapped"),
        ("overridden", "unmapped"),  # risk-disagree is not one this use case offers here
    ]
    assert (out.withheld_by_consent, out.card_not_served, out.repeated, out.reasons_unmapped) == (1, 1, 1, 2)
    assert out.sentence().startswith(
        "2 of 5 feedback entries released (1 withheld by consent, 1 on a card not recorded as served, "
        "1 superseded by a later answer on the same card); 0 released without pseudonyms"
    )
    assert hmac_ids(pl.Series(["B"]), key=KEY, kind="subject")[0] not in out.frame["subject_id"].to_list()


def test_same_records_same_rows_whatever_their_order():
    preds = [served(f"c{i}", f"P{i}", f"E{i}") for i in range(5)]
    answers = [answer(f"c{i}", "accepted", at=f"2026-03-0{i + 1}T09:00:00+00:00") for i in range(5)]

    def release(p: list[dict], a: list[dict]) -> pl.DataFrame:
        return pseudonymise_feedback(
            p, a, offered_reasons=OFFERED, vault=Vault.empty(), hmac_key=KEY, opted_out=NO_ONE
        ).frame

    a, b = release(preds, answers), release(preds[::-1], answers[::-1])
    assert a.equals(b)


def test_unreadable_lines_are_counted_and_the_rest_read(tmp_path: Path):
    (tmp_path / "2026-03-02.jsonl").write_text('{"a": 1}\n{"a": 2\n[1]\n\n')
    (tmp_path / "2026-03-03.jsonl").write_text('{"a": 3}\n')
    (tmp_path / ".tmp.jsonl").write_text('{"a": 4}\n')
    got = read_json_lines(tmp_path)
    assert [r["a"] for r in got.records] == [1, 3] and got.unreadable == 2
    assert read_json_lines(tmp_path / "absent").records == []


def rows(spec: dict[str, tuple[int, int]], *, band: str = "warning") -> pl.DataFrame:
    """Feedback rows: per period, (accepted, overridden), each on its own stay."""
    out, h = [], 1
    for period, (acc, over) in spec.items():
        for outcome, n in (("accepted", acc), ("overridden", over)):
            for _ in range(n):
                reason = "data-wrong" if outcome == "overridden" else None
                out.append((h, h, "v1", outcome, reason, 0.3, band, period))
                h += 1
    return pl.DataFrame(out, schema=FEEDBACK_SCHEMA, orient="row")


def test_wilson_interval_contains_the_rate_and_narrows_with_n():
    lo, hi = wilson(3, 10)
    lo2, hi2 = wilson(30, 100)
    assert lo < 0.3 < hi and lo < lo2 < 0.3 < hi2 < hi
    assert wilson(0, 5)[0] == 0.0


@pytest.mark.parametrize(
    ("spec", "rising", "judged"),
    [
        ({"2026Q1": (80, 20), "2026Q2": (80, 20), "2026Q3": (20, 30)}, True, True),  # 60% vs 20% before
        ({"2026Q1": (80, 20), "2026Q2": (75, 25)}, False, True),  # 25%: CI reaches below 20%
        ({"2026Q1": (80, 20), "2026Q2": (2, 8)}, False, False),  # 10 answers < 11
        ({"2026Q1": (80, 20)}, False, False),  # one period
    ],
)
def test_the_rising_override_rule(spec, rising, judged):
    got = rising_override(rows(spec), min_cell_size=11)
    assert (got.rising, got.judged) == (rising, judged)
    if judged:
        assert got.ci is not None and got.earlier_rate is not None
        assert (got.ci[0] > got.earlier_rate) == rising
        assert ("wholly above" in got.sentence()) and (("not rising" in got.sentence()) != rising)
    else:
        assert got.sentence().startswith("override rate not judged")


def test_rates_by_unit_subgroup_band_and_period_with_small_cells_masked():
    fb = rows({"2026Q1": (30, 12), "2026Q2": (5, 3)})
    # stays 1..30 (accepted of Q1) in MICU, the rest in SICU; stay 50 is not in the cohort
    cohort = pl.DataFrame(
        {
            "hadm_id": list(range(1, 50)),
            "unit": ["MICU"] * 30 + ["SICU"] * 19,
            "sex": ["F"] * 49,
            "age_band": ["18-44"] * 49,
            "race_ethnicity": ["White"] * 49,
            "site": ["A"] * 49,
        }
    )
    m = feedback_monitoring(
        fb, cohort, attributes=["sex", "age_band"], min_cell_size=11, offered_reasons=OFFERED
    )
    overall = m.overall()
    assert (overall.answered, overall.accepted, overall.overridden) == (50, 35, 15)
    assert overall.override_rate == pytest.approx(15 / 50)
    units = {g.group: g for g in m.by("unit")}
    assert set(units) == {"MICU", "SICU", NOT_RELEASED}
    # MICU: 30 accepted, 0 overridden -> shown (0 is not a small count)
    assert (units["MICU"].answered, units["MICU"].overridden, units["MICU"].override_rate) == (30, 0, 0.0)
    # SICU: 19 = 5 accepted + 14 overridden... 5 accepted is small: count and rate masked, total shown
    s = units["SICU"]
    assert s.answered == 19 and s.accepted is None and s.overridden == 14 and s.override_rate is None
    # one stay outside the cohort: the whole group masked
    assert units[NOT_RELEASED].answered is None
    periods = {g.group: g for g in m.by("period")}
    assert periods["2026Q2"].answered is None and periods["2026Q1"].answered == 42
    assert [g.dimension for g in m.groups][:2] == ["overall", "unit"] and m.by("risk_band")
    assert not m.by("race_ethnicity")  # not an attribute of this call
    md = feedback_markdown(m)
    assert r"| SICU | 19 | \<11 | 14 | masked |" in md  # Markdown-escaped
    assert r"| MICU | 30 | 30 | 0 | 0.0% \(" in md
    assert m.rising.sentence() in md.replace("\\", "")


def test_no_feedback_says_so():
    m = feedback_monitoring(rows({}), None, attributes=["sex"], min_cell_size=11)
    assert feedback_markdown(m) == "No clinician feedback recorded yet."
    assert all(g.group == NOT_RELEASED for g in m.by("unit")) and m.metadata() == {"feedback_answered": 0}


def test_the_monitoring_report_shows_the_feedback_section_escaped():
    fb = rows({"2026Q1": (30, 12), "2026Q2": (20, 30)})
    cohort = pl.DataFrame({"hadm_id": list(range(1, 93)), "unit": ["<b>ICU</b>"] * 92})
    m = feedback_monitoring(fb, cohort, attributes=["sex"], min_cell_size=11, offered_reasons=OFFERED)
    assert m.rising.rising  # 60% (CI 46% to 72%) against 29% before
    uc = load_use_case(PROJECT_ROOT / "usecases" / "icu_mortality_24h.yaml")
    kw = {
        "use_case": uc,
        "batches": [],
        "performance": [],
        "decisions": [],
        "config": MonitoringConfig(),
        "model_version": "v1",
        "code_version": "c",
    }
    html, md = monitoring_report(**kw, feedback=feedback_view(m))  # type: ignore[arg-type]
    assert "Clinician feedback at the point of care" in html and m.rising.sentence() in unescape(html)
    assert "&lt;b&gt;ICU&lt;/b&gt;" in html and "<b>ICU" not in html
    assert 'class="verdict fail"' in html and "override rate rising" in md
    without, _ = monitoring_report(**kw)  # type: ignore[arg-type]
    assert "Clinician feedback" not in without
