"""Where every delivered row went, as the CLI prints it."""

import json
from pathlib import Path

from clinical_ml.core.delivery import ZonePaths, ledger_entry_path
from clinical_ml.core.row_accounting import batch_account


def _zones(root: Path) -> ZonePaths:
    return ZonePaths(root / "landing", root / "archive", root / "quarantine", root / "phi")


def _entry(
    zones: ZonePaths, source: str, rows_in: int, rejected: dict[str, int], status: str = "accepted"
) -> None:
    path = ledger_entry_path(zones, "b1", source)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = sum(rejected.values())
    entry = {
        "source": source,
        "status": status,
        "rows_in": rows_in,
        "rows_accepted": rows_in - n,
        "rows_rejected": n,
        "rejected_by_reason": rejected,
    }
    path.write_text(json.dumps(entry))


def _privacy(root: Path, **record) -> None:
    (root / "deid" / "privacy").mkdir(parents=True, exist_ok=True)
    (root / "deid" / "privacy" / "b1.json").write_text(json.dumps(record))


def test_rejected_and_withheld_rows_are_counted_by_reason_and_the_batch_is_not_clean(tmp_path):
    zones = _zones(tmp_path)
    _entry(zones, "patients", 10, {})
    _entry(zones, "encounters", 12, {"unknown_patient": 1})
    _entry(zones, "labs", 100, {"unknown_unit": 5, "future_date:result_time": 2, "duplicate_row": 1, "x": 1})
    _entry(zones, "vitals", 0, {}, status="quarantined")
    _privacy(tmp_path, released=True, admissions_withheld=2, events_withheld=30, published={"records": 9})
    account = batch_account(zones, tmp_path / "deid", "b1")
    assert not account.clean and account.rows_rejected == 10
    text = "\n".join(account.lines())
    assert "encounters 12 delivered, 11 accepted, 1 rejected (1 unknown_patient)" in text
    assert "labs 100 delivered, 91 accepted, 9 rejected (5 unknown_unit, 2 future_date:result_time, " in text
    assert "1 more reasons" in text
    assert "vitals quarantined" in text
    assert (
        "released to the de-identified layer: 9 admissions; the privacy gate withheld 2 admissions (30 events)"
        in text
    )
    assert all(s.accounted for s in account.sources)
    # under the cumulative scope the same people are held back, and a batch says what it released of earlier ones
    _privacy(
        tmp_path,
        released=True,
        risk_scope="cumulative",
        admissions_withheld=2,
        events_withheld=30,
        published={"records": 12},
        held_back_from_earlier={"admissions_released_by_batch": {"b0": 3}},
    )
    account = batch_account(zones, tmp_path / "deid", "b1")
    text = "\n".join(account.lines())
    assert (
        "released to the de-identified layer: 9 admissions; the privacy gate held back 2 admissions" in text
    )
    assert "released with a later delivery" in text and "withheld 2" not in text
    assert "also released now: 3 admissions held back by earlier deliveries (b0)" in text
    assert account.admissions_released == 9 and account.released_from == {"b0": 3} and not account.clean


def test_a_clean_batch_and_one_the_privacy_gate_held_back(tmp_path):
    zones = _zones(tmp_path)
    for source in ("patients", "encounters", "labs", "vitals"):
        _entry(zones, source, 5, {})
    _privacy(tmp_path, released=True, admissions_withheld=0, events_withheld=0, published={"records": 5})
    assert batch_account(zones, tmp_path / "deid", "b1").clean
    # releasing admissions an earlier delivery held back withholds nothing of this one: still clean (the CLI
    # said "with rows rejected or withheld" of such a batch)
    _privacy(
        tmp_path,
        released=True,
        risk_scope="cumulative",
        admissions_withheld=0,
        events_withheld=0,
        published={"records": 8},
        held_back_from_earlier={"admissions_released_by_batch": {"b0": 3}},
    )
    carried = batch_account(zones, tmp_path / "deid", "b1")
    assert carried.released_from == {"b0": 3} and carried.clean
    _privacy(tmp_path, released=False, admissions_withheld=0, events_withheld=0, published={})
    held = batch_account(zones, tmp_path / "deid", "b1")
    assert not held.clean and "nothing of this batch was released" in "\n".join(held.lines())
    (tmp_path / "deid" / "privacy" / "b1.json").unlink()
    assert "not anonymized yet" in "\n".join(batch_account(zones, tmp_path / "deid", "b1").lines())


def test_delivery_rows_count_admissions_from_export_to_cohort(tmp_path):
    from clinical_ml.core.row_accounting import delivery_rows

    zones = _zones(tmp_path)
    for source in ("patients", "labs", "vitals"):
        _entry(zones, source, 5, {})
    _entry(zones, "encounters", 12, {"unknown_patient": 1, "future_date:admit_time": 2})
    _privacy(tmp_path, released=True, admissions_withheld=2, events_withheld=30, published={"records": 7})
    account = batch_account(zones, tmp_path / "deid", "b1").as_dict()
    (row,) = delivery_rows([account], {"b1": 5})
    assert row == {
        "batch_id": "b1", "delivered": 12, "accepted": 9, "rejected": 3,
        "reasons": "2 future_date:admit_time, 1 unknown_patient", "withheld": 2, "released": 7, "in_cohort": 5,
        "released_later": 0, "held_back": False,
    }  # fmt: skip
    # a later delivery released one of the two held back: it counts as released in this delivery's row
    later = {"batch_id": "b2", "released": True, "released_from": {"b1": 1}, "sources": []}
    row, _ = delivery_rows([account, later], {"b1": 6})
    assert (row["withheld"], row["released"], row["released_later"]) == (1, 8, 1)
    assert row["accepted"] == row["withheld"] + row["released"]
