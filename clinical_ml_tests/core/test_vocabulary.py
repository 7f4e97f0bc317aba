"""The vocabulary is a data file a hospital extends by configuration."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clinical_ml.core import units
from clinical_ml.core.units import VocabularyError, load_vocabulary

EXTENSION = """
labs:
  "2532-0": {name: lactate dehydrogenase, unit: U/L, plausible: [10, 20000]}
  "2160-0": {name: creatinine, unit: mg/dL, plausible: [0.1, 25], convert: {umol/L: {divide: 88.4}}}
vitals:
  etco2: {name: end-tidal CO2, unit: "mm[Hg]", plausible: [0, 150], convert: {kPa: {multiply: 7.50062}}}
"""


def test_the_shipped_vocabulary_has_the_common_icu_codes_weight_and_height():
    for loinc in ("2160-0", "2951-2", "2075-0", "1963-8", "4544-3", "6301-6", "2093-3", "2744-1"):
        assert loinc in units.LAB_CODES
    for vital in ("heart_rate", "spo2", "weight", "height"):
        assert vital in units.VITAL_CODES
    assert units.UNIT_CONVERSIONS[("weight", "[lb_av]")](100.0) == pytest.approx(45.359237)
    assert units.UNIT_CONVERSIONS[("temperature", "[degF]")](98.6) == pytest.approx(37.0)
    assert all(lo <= hi for lo, hi in units.TYPICAL_MEDIAN_RANGES.values())


def test_an_extension_adds_codes_and_overrides_a_shipped_entry(tmp_path):
    ext = tmp_path / "site.yaml"
    ext.write_text(EXTENSION)
    vocab = load_vocabulary([ext])
    assert vocab.labs["2532-0"].name == "lactate dehydrogenase"
    assert vocab.labs["2160-0"].plausible == (0.1, 25)
    assert vocab.vitals["etco2"].convert["kPa"](1.0) == pytest.approx(7.50062)
    assert "2951-2" in vocab.labs  # the rest of the shipped vocabulary stays


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("labs:\n  '2532-0': {name: LDH, unit: U/L, plausible: [100, 10]}\n", "labs.2532-0.plausible"),
        ("labs:\n  '2532-0': {name: LDH, unit: U/L}\n", "labs.2532-0.plausible: Field required"),
        ("vitals:\n  heart_rate: {name: x, unit: /min, plausible: [0, 1], colour: red}\n", "colour"),
        ("labs:\n  'bad code!': {name: x, unit: U/L, plausible: [0, 1]}\n", "codes must be"),
        ("vitals:\n  '2160-0': {name: x, unit: U/L, plausible: [0, 1]}\n", "both as labs and as vitals"),
        ("- a list\n", "expected a mapping"),
        # a broader code that does not exist, is itself narrower, or has another unit
        (
            "vitals:\n  bp_x: {name: x, unit: 'mm[Hg]', plausible: [0, 1], broader: nope}\n",
            "vitals bp_x: broader",
        ),
        (
            "vitals:\n  bp_x: {name: x, unit: 'mm[Hg]', plausible: [0, 1], broader: mean_bp_invasive}\n",
            "vitals bp_x: broader",
        ),
        (
            "vitals:\n  bp_x: {name: x, unit: '%', plausible: [0, 1], broader: mean_bp}\n",
            "vitals bp_x: broader",
        ),
    ],
)
def test_a_bad_extension_is_refused_naming_the_file_and_field(tmp_path, text, says):
    ext = tmp_path / "site.yaml"
    ext.write_text(text)
    with pytest.raises(VocabularyError, match=r"site\.yaml") as err:
        load_vocabulary([ext])
    assert says in str(err.value)


def test_the_landing_zone_and_use_cases_accept_a_code_the_hospital_added(tmp_path):
    """With CLINICAL_ML_VOCABULARY set, ingestion's schema and the use-case check know the new codes."""
    ext = tmp_path / "site.yaml"
    ext.write_text(EXTENSION)
    probe = (
        "from clinical_ml.core.ingestion import SCHEMAS\n"
        "from clinical_ml.core.units import is_known_code\n"
        "allowed = SCHEMAS['labs'].columns['loinc_code'].checks[0].statistics['allowed_values']\n"
        "print('2532-0' in allowed, is_known_code('VITAL//etco2', measurements_only=True))\n"
    )
    env = {**os.environ, "CLINICAL_ML_VOCABULARY": str(ext)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
    env.pop("CLINICAL_ML_VOCABULARY")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    assert Path(units.VOCABULARY_FILE).exists()


def test_a_feature_on_a_broader_code_takes_every_narrower_code_and_a_narrower_feature_only_its_own():
    from clinical_ml.core.units import BROADER_CODES, feature_code_members

    narrower = [c for c, b in BROADER_CODES.items() if b == "VITAL//mean_bp"]
    assert len(narrower) >= 2  # arterial line and cuff
    members = feature_code_members(["VITAL//mean_bp", narrower[0]])
    assert members[narrower[0]] == (narrower[0], "VITAL//mean_bp")
    assert all(members[c] == ("VITAL//mean_bp",) for c in narrower[1:])
    # without the broader code as a feature, nothing rolls up
    assert feature_code_members([narrower[1]]) == {narrower[1]: (narrower[1],)}
