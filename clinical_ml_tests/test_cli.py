"""``clinical-ml run`` and ``clinical-ml usecase check`` through ``cli.main``: which use cases run, clear errors
for bad input, the feasibility summary on de-identified data, and a new YAML in a fresh folder run end to end
(the bug report: it had no command, and ``clinical-ml demo`` crashed on a missing ``deid/usecases``)."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from clinical_ml import cli
from clinical_ml.core.artifacts import DeidStore
from clinical_ml.core.usecase import UseCaseError, load_use_case, load_use_cases, parse_use_case
from clinical_ml_tests.conftest import PROJECT_ROOT
from clinical_ml_tests.core.test_feasibility import DEATHS, EVENTS, SITES, hospital

ICU = PROJECT_ROOT / "usecases" / "icu_mortality_24h.yaml"
READMISSION_30D = """\
name: readmission_30d
title: Readmission within 30 days of discharge
clinical_question: Among adults discharged alive, who is readmitted within 30 days?
owner: clinical-ml-team
population:
  inclusion: Adults discharged alive.
  exclusion: Deaths in hospital and transfers to another hospital.
prediction_time:
  anchor: discharge
observation_window_hours: 48
outcome:
  type: readmission
  within_days: 30
  description: Any new admission within 30 days after discharge.
features:
  window_hours: [48]
  aggregations: [last, min, max, count]
  codes: [LAB//2160-0, LAB//718-7, VITAL//heart_rate]
  static: [age_years, sex, admission_type]
  history:
    - days: 365
operating_point:
  policy: min_sensitivity
  target: 0.8
success_criteria:
  auroc_min: 0.6
  sensitivity_min: 0.5
  specificity_min: 0.3
subgroups:
  attributes: [sex, age_band]
  age_bands: [18, 65]
"""


def renamed(path: Path, name: str, **update: object) -> str:
    """A use-case file's text under another name, with fields replaced."""
    raw = yaml.safe_load(path.read_text())
    raw.update(name=name, **update)
    return yaml.safe_dump(raw)


@pytest.fixture(autouse=True)
def _no_instance_or_folder_from_the_environment(monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("CLINICAL_ML_USECASES", raising=False)
    monkeypatch.delenv("CLINICAL_ML_DATA_ROOT", raising=False)


def folder(tmp_path: Path, **files: str) -> Path:
    d = tmp_path / "usecases"
    d.mkdir()
    for name, text in files.items():
        (d / f"{name}.yaml").write_text(text)
    return d


# --- which use cases run ---------------------------------------------------------------------------------


def _written_for(name: str, datasets: list[str]):
    return parse_use_case(renamed(ICU, name, datasets=datasets))


CASES = [
    _written_for("any_data", []),
    _written_for("eicu_only", ["eicu"]),
    _written_for("two", ["synthetic", "mimic"]),
]


@pytest.mark.parametrize(
    ("data", "expected"),
    [("synthetic", ["any_data", "two"]), ("eicu", ["any_data", "eicu_only"]), ("mimic", ["any_data", "two"])],
)
def test_without_names_the_use_cases_written_for_the_data_run(data, expected):
    assert [uc.name for uc in cli.select_use_cases(CASES, names=None, data=data)] == expected


def test_names_given_run_in_their_order_whatever_their_datasets():
    chosen = cli.select_use_cases(CASES, names=["eicu_only", "any_data", "eicu_only"], data="synthetic")
    assert [uc.name for uc in chosen] == ["eicu_only", "any_data"]


def test_no_use_case_for_the_data_says_how_to_name_one():
    with pytest.raises(cli.CommandError, match=r"no use case is written for --data mimic.*--usecase"):
        cli.select_use_cases(CASES[1:2], names=None, data="mimic")


def test_an_unknown_name_lists_the_names_available_and_writes_nothing(tmp_path, capsys):
    uc_dir = folder(tmp_path, icu=ICU.read_text(), readmission=READMISSION_30D)
    root = tmp_path / "data"
    rc = cli.main(["run", "--usecase", "sepsis", "--usecases-dir", str(uc_dir), "--data-root", str(root)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no use case named sepsis; available: icu_mortality_24h, readmission_30d" in err
    assert not root.exists()


def test_a_broken_file_in_the_folder_names_the_file_and_the_field(tmp_path, capsys):
    uc_dir = folder(tmp_path, broken=READMISSION_30D.replace("within_days: 30", "within_days: -1"))
    rc = cli.main(["demo", "--usecases-dir", str(uc_dir), "--data-root", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{uc_dir / 'broken.yaml'}: outcome.readmission.within_days" in err


def test_a_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["run", "--usecases-dir", str(tmp_path / "nowhere")]) == 2
    assert "use case folder" in capsys.readouterr().err


def _failure(step: str, cls_name: str, message: str) -> SimpleNamespace:
    user = SimpleNamespace(cls_name=cls_name, message=message, cause=None)
    wrapper = SimpleNamespace(cls_name="DagsterExecutionStepExecutionError", message="op failed", cause=user)
    return SimpleNamespace(
        step_key=step, is_step_failure=True, step_failure_data=SimpleNamespace(error=wrapper)
    )


def test_run_failures_are_told_per_use_case_and_a_gate_refusal_is_not_one():
    result = SimpleNamespace(
        all_events=[
            SimpleNamespace(step_key="a__cohort", is_step_failure=False),
            _failure("a__risk_model", "ValueError", "ValueError: no outcome events in tuning (3 rows)\nmore"),
            _failure("a__promotion_decision", "ValueError", "later failure of the same use case"),
            _failure("b__promotion_decision_challenger_meets_minimums_on_lower_ci_bound", "X", "refused"),
            _failure("c__patient_features", "KeyError", "'a value from the data'"),
        ]
    )
    assert cli._failures_by_use_case(result, ["a", "b", "c"]) == {  # type: ignore[arg-type]
        "a": "step risk_model failed (no outcome events in tuning (3 rows))",
        "c": "step patient_features failed (KeyError)",  # only our own ValueError messages are repeated
    }


# --- a new YAML appears in the graph (make dev) without a code change --------------------------------------


def test_definitions_pick_up_every_yaml_of_the_folder_and_name_a_broken_one(tmp_path):
    from clinical_ml.defs.build import build_definitions

    uc_dir = folder(tmp_path, icu=ICU.read_text(), readmission=READMISSION_30D)
    defs = build_definitions(data_root=tmp_path / "data", usecases_dir=uc_dir)
    roots = {k.path[0] for k in defs.resolve_asset_graph().get_all_asset_keys() if len(k.path) > 1}
    assert {"icu_mortality_24h", "readmission_30d"} <= roots

    (uc_dir / "readmission.yaml").write_text(READMISSION_30D.replace("anchor: discharge", "anchor: tomorrow"))
    with pytest.raises(UseCaseError, match=r"readmission\.yaml: prediction_time\.anchor"):
        build_definitions(data_root=tmp_path / "data", usecases_dir=uc_dir)


# --- clinical-ml usecase check --------------------------------------------------------------------------------


def test_check_names_an_unknown_code_and_fails(tmp_path, capsys):
    uc_dir = folder(tmp_path, bad=READMISSION_30D.replace("LAB//718-7", "LAB//9999-9"))
    assert cli.main(["usecase", "check", str(uc_dir / "bad.yaml")]) == 1
    err = capsys.readouterr().err
    assert "bad.yaml: features.codes" in err and "'LAB//9999-9' not in the vocabulary" in err


def test_check_of_a_missing_file_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["usecase", "check", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err


def test_check_without_data_says_the_file_is_valid_and_where_it_looked(tmp_path, capsys):
    uc_dir = folder(tmp_path, readmission=READMISSION_30D)
    rc = cli.main(["usecase", "check", str(uc_dir / "readmission.yaml"), "--data-root", str(tmp_path / "d")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "valid use case readmission_30d" in out
    assert f"no de-identified data found under {tmp_path / 'd' / 'deid'}" in out


def _deid(root: Path, sites: list[str], deaths: set[int]) -> None:
    deid = DeidStore(root / "deid", root / "reports")
    enc, pat = hospital(sites, deaths, short=1)
    deid.encounters.part("b1").write(enc)
    deid.patients.part("b1").write(pat)
    deid.events.part("b1").write(EVENTS)


def _small_icu(tmp_path: Path) -> Path:
    """The mortality use case on two codes (the hand-counted hospital of the feasibility tests), asked as that
    hospital can answer it: it has no ICU unit events or unit types, so 24 h after hospital admission, any unit
    (the settings of the shipped file before it was anchored at ICU admission)."""
    shipped = yaml.safe_load(ICU.read_text())
    text = renamed(
        ICU,
        "icu_small",
        population={**shipped["population"], "unit_types": None},
        prediction_time={"anchor": "admission", "offset_hours": 24},
        features={
            "window_hours": [24],
            "aggregations": ["last"],
            "codes": ["LAB//2160-0", "VITAL//heart_rate"],
            "static": ["age_years", "sex"],
        },
    )
    return folder(tmp_path, icu_small=text) / "icu_small.yaml"


def test_check_prints_the_feasibility_of_the_data_present(tmp_path, capsys):
    _deid(tmp_path / "data", SITES, DEATHS)
    rc = cli.main(["usecase", "check", str(_small_icu(tmp_path)), "--data-root", str(tmp_path / "data")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Excluded: stay ended before the prediction time" in out
    assert "eligible stays 40; prediction rows 40" in out
    assert "deaths: 14 in 14 stays; prevalence 35.0%" in out
    assert "2.0 stays with death per candidate feature: thin (rule of thumb: fewer than 10" in out
    site_b = next(line for line in out.splitlines() if "SITE_B" in line)
    assert site_b.split() == ["site", "SITE_B", "<", "11", "<", "11", "-"]
    heart_rate = next(line for line in out.splitlines() if "VITAL//heart_rate" in line)
    assert heart_rate.endswith("0.0%  absent from the data")
    assert "LAB//2160-0" in out and "50.0%" in out
    assert out.rstrip().endswith("can be trained on these data")


def test_check_json_masks_small_cells_and_never_names_free_text(tmp_path, capsys):
    free_text = "Ward 3 of Dr Smith, St. Mary's"
    _deid(tmp_path / "data", ["SITE_A"] * 30 + [free_text] * 11, DEATHS)
    argv = ["usecase", "check", str(_small_icu(tmp_path)), "--data-root", str(tmp_path / "data")]
    assert cli.main([*argv, "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out)
    assert result["valid"] and result["use_case"] == "icu_small"
    f = result["feasibility"]
    assert (f["eligible_stays"], f["events"], f["candidate_features"]) == (40, 14, 7)
    other = next(g for g in f["groups"] if g["attribute"] == "site" and g["value"] != "SITE_A")
    assert other == {
        "attribute": "site",
        "value": "other (not a code)",
        "stays": "< 11",
        "events": "< 11",
        "prevalence": None,
    }
    assert "Smith" not in out
    assert cli.main(argv) == 0
    assert "Smith" not in capsys.readouterr().out


# --- clinical-ml run: a new YAML in a fresh folder, end to end -------------------------------------------------


@pytest.mark.slow
def test_run_trains_a_new_use_case_from_a_fresh_folder_and_stops_one_the_data_cannot_serve(tmp_path, capsys):
    # a use case no code names, and a 30-day readmission that 2 days of data cannot label yet
    uc_dir = folder(
        tmp_path,
        death_48h=renamed(ICU, "icu_death_48h", datasets=[], prediction_time={"offset_hours": 48}),
        readmission=READMISSION_30D,
    )
    root = tmp_path / "data"
    hospital_args = [
        "--data-root",
        str(root),
        "--patients",
        "300",
        "--batches",
        "2",
        "--usecases-dir",
        str(uc_dir),
    ]

    rc = cli.main(["run", *hospital_args])
    out = capsys.readouterr().out
    assert rc == 1  # one of the use cases asked for did not run
    assert "readmission_30d: not run: no outcome is known yet" in out
    assert f"clinical-ml usecase check {uc_dir / 'readmission.yaml'}" in out
    assert "== icu_death_48h ==" in out and "validation AUROC" in out
    store = DeidStore(root / "deid", root / "reports")
    assert store.use_case("icu_death_48h").evaluation.exists()
    assert not store.use_case("readmission_30d").folder.exists()

    shutil.rmtree(root / "reports")
    assert cli.main(["run", "--usecase", "icu_death_48h", *hospital_args]) == 0
    out = capsys.readouterr().out
    assert "readmission_30d" not in out and "== icu_death_48h ==" in out
    assert load_use_case(uc_dir / "death_48h.yaml").prediction_time.offset_hours == 48


def test_the_readme_example_is_a_valid_use_case_and_its_commands_exist(capsys):
    readme = (PROJECT_ROOT / "README.md").read_text()
    section = readme.split("## Your own question", 1)[1].split("\n## ", 1)[0]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    uc = parse_use_case(example, source="README.md")
    assert (uc.name, uc.outcome.type, uc.prediction_time.anchor) == (
        "readmission_30d_older",
        "readmission",
        "discharge",
    )
    assert uc.name not in {u.name for u in load_use_cases(PROJECT_ROOT / "usecases")}  # a new question
    assert f"clinical-ml usecase check usecases/{uc.name}.yaml" in section
    assert f"make demo USECASE={uc.name} " in section
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    assert "--usecase NAME" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_demo_passes_each_usecase_to_the_command():
    import subprocess

    dry = subprocess.run(
        ["make", "-n", "demo", "USECASE=readmission_30d icu_mortality_24h"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--usecase readmission_30d --usecase icu_mortality_24h" in dry
