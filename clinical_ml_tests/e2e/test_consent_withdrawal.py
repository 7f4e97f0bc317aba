"""Consent withdrawn after release (issue #16 item 4), end to end through ``clinical-ml run``.

Patients whose data were released, cohorted and trained on object; the next run withholds their rows at the
boundary, withdraws what was released (batches, MEDS export, every use-case table), and trains without them:
afterwards no de-identified table carries their pseudonym or admissions, and the new model's lineage names
only the withdrawn versions of the batches.
"""

import polars as pl
import pytest

from clinical_ml import cli
from clinical_ml.core.artifacts import DeidStore, PhiStore
from clinical_ml.core.registry import Registry
from clinical_ml.core.storage import sha256_file
from clinical_ml_tests.conftest import PROJECT_ROOT

USE_CASE = "icu_mortality_24h"


@pytest.mark.slow
def test_a_later_objection_withdraws_released_data_and_the_next_model_never_sees_it(tmp_path, capsys):
    root = tmp_path / "data"
    argv = ["run", "--usecase", USE_CASE, "--data-root", str(root), "--patients", "400", "--batches", "2"]
    argv += ["--usecases-dir", str(PROJECT_ROOT / "usecases")]
    cli.main(argv)
    deid, phi = DeidStore(root / "deid", root / "reports"), PhiStore(root / "phi")
    store = deid.use_case(USE_CASE)
    cohort = store.cohort.read()
    objecting = cohort["subject_id"].unique().sort().head(5)
    vault = phi.read_vault().patients
    mrns = vault.filter(pl.col("subject_id").is_in(objecting.implode()))["mrn"]
    hadm = cohort.filter(pl.col("subject_id").is_in(objecting.implode()))["hadm_id"].unique()
    assert mrns.len() == 5 and hadm.len() >= 5
    phi.consent_register.parent.mkdir(parents=True)
    # as a privacy office would type them: lower case, spaces
    rows = "".join(f" {m.lower()} ,2026-12-01\n" for m in mrns.to_list())
    phi.consent_register.write_text("mrn,objected_on\n" + rows)
    capsys.readouterr()

    cli.main(argv)
    out = capsys.readouterr().out

    assert "withheld by consent (the opt-out register)" in out
    tables = [p for p in (root / "deid").rglob("*.parquet") if not p.name.startswith(".")]
    assert any("usecases" in p.parts for p in tables) and any("meds" in p.parts for p in tables)
    for path in tables:
        schema = pl.read_parquet_schema(path)
        frame = pl.read_parquet(path, columns=[c for c in ("subject_id", "hadm_id") if c in schema])
        if "subject_id" in frame.columns:
            assert not frame["subject_id"].is_in(objecting.implode()).any(), path
        if "hadm_id" in frame.columns:
            assert not frame["hadm_id"].is_in(hadm.implode()).any(), path
    # every batch was re-anonymized without them, and says so in counts
    records = [r.data for r in deid.privacy.read_all()]
    assert sum(r["withheld_by_consent"]["patients"] for r in records) >= 5
    # the model trained after the withdrawal names the batches as they are now, without the objectors
    card = Registry(root / "registry", USE_CASE).newest_card()
    assert card is not None
    for batch, version in card.lineage.batch_data_versions.items():
        assert version == sha256_file(deid.events.part(batch).path)
    # their data stay in the phi zone, untouched: nothing lost
    raw = pl.read_parquet(phi.raw("patients").files())
    assert set(mrns.to_list()) <= set(raw["mrn"].str.strip_chars().str.to_uppercase().to_list())
