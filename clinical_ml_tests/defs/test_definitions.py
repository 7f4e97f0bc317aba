"""The code location loads, every asset is labelled, the graph shape is reviewed, the PHI boundary holds."""

import ast
import re
from pathlib import Path

import dagster as dg
import pytest

from clinical_ml.defs.build import build_definitions
from clinical_ml.defs.conventions import DATA_CLASS_TAG, STAGE_TAG, DataClass, Stage
from clinical_ml.defs.usecase.paths import stage_of

PACKAGE = Path(__file__).resolve().parents[2] / "clinical_ml"
PHI_READERS = {Stage.INGESTION, Stage.ANONYMIZATION}


@pytest.fixture(scope="module")
def defs(tmp_path_factory: pytest.TempPathFactory) -> dg.Definitions:
    return build_definitions(data_root=tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def specs(defs: dg.Definitions) -> list[dg.AssetSpec]:
    return list(defs.resolve_all_asset_specs())


def test_code_location_module_loads():
    from clinical_ml.definitions import defs

    defs.resolve_asset_graph()
    assert defs.resolve_job_def("lifecycle_job") is not None


def test_code_location_serializes_as_the_webserver_loads_it(defs):
    # The UI receives the repository as a serialized snapshot; `definitions validate` does not build it, so
    # an unserializable value (an Enum group name, say) passes validation and only breaks `dagster dev`.
    from dagster._core.remote_representation.external_data import RepositorySnap
    from dagster_shared.serdes import serialize_value

    assert serialize_value(RepositorySnap.from_def(defs.get_repository_def()))


def test_every_asset_has_stage_group_owner_kind_and_data_class(specs):
    assert len(specs) >= 15
    for spec in specs:
        name = spec.key.to_user_string()
        assert spec.tags.get(STAGE_TAG) in Stage.ALL, name
        # a use case's assets are one group named after it (one box per question in the lineage), the shared
        # ones their stage's group
        assert spec.group_name == (spec.key.path[0] if len(spec.key.path) > 1 else spec.tags[STAGE_TAG]), name
        assert spec.owners, name
        assert spec.kinds, name
        assert spec.tags.get(DATA_CLASS_TAG) in {d.value for d in DataClass}, name


def test_no_asset_outside_ingestion_and_anonymization_reads_phi(defs, specs):
    graph = defs.resolve_asset_graph()
    by_key = {s.key: s for s in specs}
    for spec in specs:
        if spec.tags[STAGE_TAG] in PHI_READERS:
            continue
        for parent in graph.get(spec.key).parent_keys:
            assert by_key[parent].tags[DATA_CLASS_TAG] != DataClass.PHI, (spec.key, parent)
    # and phi assets live only in ingestion
    assert {s.tags[STAGE_TAG] for s in specs if s.tags[DATA_CLASS_TAG] == DataClass.PHI} == {Stage.INGESTION}


def test_site_id_delivery_is_the_only_phi_asset_outside_ingestion_and_a_leaf(tmp_path):
    site = build_definitions(data_root=tmp_path, fhir_subject="site")
    graph = site.resolve_asset_graph()
    phi_outside = {
        k
        for k in graph.get_all_asset_keys()
        if graph.get(k).tags.get(DATA_CLASS_TAG) == DataClass.PHI
        and graph.get(k).tags[STAGE_TAG] != Stage.INGESTION
    }
    assert phi_outside and all(stage_of(k) == "ehr_delivery" for k in phi_outside)
    for k in phi_outside:
        assert graph.get(k).tags[STAGE_TAG] == Stage.DELIVERY and not graph.get(k).child_keys
    with pytest.raises(ValueError, match="CLINICAL_ML_FHIR_SUBJECT"):
        build_definitions(data_root=tmp_path, fhir_subject="mrn")


def test_graph_shape_snapshot(defs, specs, snapshot):
    graph = defs.resolve_asset_graph()
    shape = {
        "assets": {
            s.key.to_user_string(): {
                "group": s.group_name,
                "stage": s.tags[STAGE_TAG],
                "deps": sorted(p.to_user_string() for p in graph.get(s.key).parent_keys),
                "data_class": s.tags[DATA_CLASS_TAG],
            }
            for s in sorted(specs, key=lambda s: s.key.to_user_string())
        },
        "checks": sorted(f"{k.asset_key.to_user_string()}:{k.name}" for k in graph.asset_check_keys),
        "jobs": sorted(j.name for j in defs.jobs or []),
        "schedules": sorted(s.name for s in defs.schedules or []),
        "sensors": sorted(s.name for s in defs.sensors or []),
    }
    assert shape == snapshot


def test_core_never_imports_dagster():
    offenders = []
    for path in (PACKAGE / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "dagster" or n.startswith(("dagster.", "dagster_")) for n in names):
                offenders.append(path.name)
    assert offenders == []


def test_dagster_facing_modules_do_not_postpone_annotations():
    for folder in ("defs", "resources"):
        for path in (PACKAGE / folder).rglob("*.py"):
            assert "from __future__ import annotations" not in path.read_text(), path


def test_defs_name_no_artifact_file_and_never_import_upwards():
    """Artifacts are reached through the typed stores and the Registry (core/artifacts.py, core/registry.py):
    no file name of an artifact in the wiring, and nothing in defs/ imports the command-line modules."""
    file_name = re.compile(r"""["'][\w./-]*\.(json|jsonl|parquet|txt|pkl|ndjson|html|png)["']""")
    offenders = []
    for path in (PACKAGE / "defs").rglob("*.py"):
        text = path.read_text()
        offenders += [f"{path.name}: {m.group(0)}" for m in file_name.finditer(text)]
        offenders += [
            f"{path.name}: imports the CLI" for m in re.finditer(r"from clinical_ml\.(cli|replay)\b", text)
        ]
    assert offenders == []


def test_a_location_shows_only_the_use_cases_written_for_its_data(tmp_path):
    """The UI's location for one data source holds no branch it cannot materialize (issue 19 item 2)."""
    every = {
        k.path[0] for k in build_definitions(data_root=tmp_path).resolve_all_asset_keys() if len(k.path) > 1
    }
    eicu = {k.path[0] for k in build_definitions(data_root=tmp_path, data="eicu").resolve_all_asset_keys()}
    synthetic = {
        k.path[0] for k in build_definitions(data_root=tmp_path, data="synthetic").resolve_all_asset_keys()
    }
    assert {"eicu_mortality_24h", "icu_mortality_24h"} <= every
    assert "eicu_mortality_24h" in eicu and "icu_mortality_24h" not in eicu
    assert (
        "icu_mortality_24h" in synthetic and not {"eicu_mortality_24h", "mimic_readmission_30d"} & synthetic
    )
