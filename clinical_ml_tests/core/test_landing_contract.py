"""The landing contract document is the one the code validates with."""

from pathlib import Path

from clinical_ml.core import ingestion, landing
from clinical_ml.core.landing_contract import contract_markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "landing-contract.md"


def _generated_part() -> str:
    text = DOC.read_text()
    return text.split("<!-- contract:start -->\n", 1)[1].split("<!-- contract:end -->", 1)[0]


def test_the_document_is_generated_from_the_code():
    assert _generated_part() == contract_markdown(), "regenerate docs/landing-contract.md (see its header)"


def test_every_source_column_and_allowed_value_is_documented():
    doc = _generated_part()
    for source in landing.SOURCES:
        assert f"### `{source}`" in doc
        for name, column in ingestion.SCHEMAS[source].columns.items():
            row = next(line for line in doc.splitlines() if line.startswith(f"| `{name}` |"))
            assert ("may be empty" in row) == column.nullable
            for check in column.checks:
                for value in (check.statistics or {}).get("allowed_values", [])[:12]:
                    assert f"`{value}`" in doc


def test_a_changed_rule_changes_the_document(monkeypatch):
    before = contract_markdown()
    monkeypatch.setattr(ingestion, "DUPLICATE_KEYS", {**ingestion.DUPLICATE_KEYS, "vitals": ["encounter_id"]})
    assert contract_markdown() != before
