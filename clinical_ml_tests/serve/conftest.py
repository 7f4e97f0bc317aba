"""A small registry with one approved model, EHR signing keys and tokens, and a FHIR stay to send."""

import json
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import jwt
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from clinical_ml.core.features import feature_columns
from clinical_ml.core.gate import GateCriterion, GateResult
from clinical_ml.core.modeling import train_model
from clinical_ml.core.registry import ModelCard, PromotionDecision, Registry, new_version
from clinical_ml.core.site_mapping import load_site_mapping
from clinical_ml.core.training import training_ranges
from clinical_ml.core.units import LAB_CODES, TYPICAL_MEDIAN_RANGES, feature_stem
from clinical_ml.core.usecase import UseCase, load_use_case
from clinical_ml.serve.examples import hook_request
from clinical_ml_tests.conftest import PROJECT_ROOT

USE_CASE = "icu_mortality_24h"
ISSUER = "https://ehr.example.test"
BASE_URL = "http://cds.example.test"
UTC_TZ = ZoneInfo("UTC")
ONE_HOT = [
    "sex__f",
    "sex__m",
    "admission_type__emergency",
    "admission_type__elective",
    "unit__micu",
    "unit__sicu",
]


def use_case() -> UseCase:
    return load_use_case(PROJECT_ROOT / "usecases" / f"{USE_CASE}.yaml")


def train_and_register(root: Path, uc: UseCase, *, seed: int, approve: bool = True) -> str:
    """Fit a small model on made-up feature rows (risk rising with the highest lactate) and register it;
    ``approve`` records a promotion decision, which moves the champion pointer."""
    cols = feature_columns(uc) + ONE_HOT
    rng = np.random.default_rng(seed)
    n = 1200
    x = np.empty((n, len(cols)))
    for k, c in enumerate(cols):
        stem, _, agg = c.partition("__")
        if c in ONE_HOT or agg.startswith("missing"):
            x[:, k] = rng.integers(0, 2, n)
        elif agg.startswith("count"):
            x[:, k] = rng.integers(0, 30, n)
        elif c == "age_years":
            x[:, k] = rng.integers(18, 91, n)
        else:
            code = next(m.partition("//")[2] for m in uc.features.codes if feature_stem(m) == stem)
            lo, hi = TYPICAL_MEDIAN_RANGES[code]
            x[:, k] = rng.uniform(lo, hi, n)
    j = cols.index("lactate__max_24h")
    y = (rng.random(n) < 1 / (1 + np.exp(-(x[:, j] - 3.0)))).astype(int)
    model = train_model(x[:800], y[:800], x[800:], y[800:], feature_names=cols, seed=seed, max_rounds=60)
    version = new_version(datetime.now(UTC) + timedelta(microseconds=seed))
    gate = GateResult((GateCriterion("minimums", "auroc", True, "AUROC lower bound 0.80 >= 0.75"),))
    card = ModelCard(
        use_case=uc.name,
        version=version,
        feature_names=tuple(cols),
        training_ranges=training_ranges(x[:800], cols),
        threshold=0.3,
        guardrails=uc.guardrails.model_dump(),
        gate=gate,
    )
    registry = Registry(root, uc.name)
    registry.register(card, model_text=model.to_text())
    if approve:
        registry.record_decision(PromotionDecision(True, version, registry.champion(), ("gate passed",)))
    return version


@pytest.fixture(scope="session")
def trained_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    train_and_register(root, use_case(), seed=1)
    return root


@pytest.fixture
def data_root(tmp_path: Path, trained_registry: Path) -> Path:
    """A data root whose registry holds one approved model (a copy per test: tests may promote)."""
    root = tmp_path / "data"
    shutil.copytree(trained_registry, root / "registry")
    return root


@pytest.fixture
def usecases_dir(tmp_path: Path) -> Path:
    d = tmp_path / "usecases"
    d.mkdir()
    (d / f"{USE_CASE}.yaml").write_text((PROJECT_ROOT / "usecases" / f"{USE_CASE}.yaml").read_text())
    return d


@dataclass(frozen=True)
class Ehr:
    """A CDS Client: its signing key, its JWK Set and a token maker."""

    key: ec.EllipticCurvePrivateKey
    kid: str

    def jwks(self) -> dict:
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [{**public, "kid": self.kid, "alg": "ES384", "use": "sig"}]}

    def token(
        self, aud: str, *, iss: str = ISSUER, lifetime: int = 120, jti: str | None = None, **extra
    ) -> str:
        now = int(time.time())
        claims = {
            "iss": iss,
            "sub": "cds-client",
            "aud": aud,
            "iat": now,
            "exp": now + lifetime,
            "jti": jti or str(uuid.uuid4()),
            **extra,
        }
        return jwt.encode(claims, self.key, algorithm="ES384", headers={"kid": self.kid, "typ": "JWT"})


@pytest.fixture(scope="session")
def ehr() -> Ehr:
    return Ehr(ec.generate_private_key(ec.SECP384R1()), "ehr-key-1")


@pytest.fixture
def trust_file(tmp_path: Path, ehr: Ehr) -> Path:
    (tmp_path / "ehr-jwks.json").write_text(json.dumps(ehr.jwks()))
    p = tmp_path / "trust.yaml"
    p.write_text(f"issuers:\n  - iss: {ISSUER}\n    jwks_file: ehr-jwks.json\n    subjects: [cds-client]\n")
    return p


ADMIT = datetime(2026, 3, 2, 8, 0)
NOW = ADMIT + timedelta(hours=30)  # the hook's time: 30 h into the stay


# a value of each code of the use case in its canonical unit
PANEL_LABS = {
    "3094-0": 20.0,
    "2951-2": 139.0,
    "2823-3": 4.1,
    "2345-7": 120.0,
    "6690-2": 9.0,
    "718-7": 11.0,
    "777-3": 210.0,
    "1975-2": 0.9,
}
PANEL_VITALS = {
    "systolic_bp": ("mm[Hg]", 118.0),
    "diastolic_bp": ("mm[Hg]", 64.0),
    "mean_bp": ("mm[Hg]", 80.0),
    "resp_rate": ("/min", 18.0),
    "spo2": ("%", 96.0),
    "gcs_total": ("{score}", 14.0),
}


def stay_request(
    *,
    lactate: float = 4.5,
    admit: datetime = ADMIT,
    unit: str = "MICU",
    birth=date(1950, 5, 6),
    n_vitals: int = 24,
) -> dict:
    """A patient-view request for a stay with a day of labs and hourly vitals, every code of the use case
    measured (creatinine in umol/L and temperature in degrees Fahrenheit, as some sites send them)."""
    panel = [
        {
            "loinc_code": code,
            "value": v,
            "unit": LAB_CODES[code][1],
            "specimen_time": admit + timedelta(hours=9),
            "result_time": admit + timedelta(hours=10),
        }
        for code, v in PANEL_LABS.items()
    ]
    charted = [
        {
            "code": code,
            "value": v,
            "unit": unit_,
            "charted_time": admit + timedelta(hours=14),
            "stored_time": admit + timedelta(hours=14, minutes=2),
        }
        for code, (unit_, v) in PANEL_VITALS.items()
    ]
    labs = (
        panel
        + [
            {
                "loinc_code": "2524-7",
                "value": lactate,
                "unit": "mmol/L",
                "specimen_time": admit + timedelta(hours=h),
                "result_time": admit + timedelta(hours=h, minutes=40),
            }
            for h in (8, 20)
        ]
        + [
            {
                "loinc_code": "2160-0",
                "value": 150.0,
                "unit": "umol/L",
                "specimen_time": admit + timedelta(hours=10),
                "result_time": admit + timedelta(hours=11),
            },
        ]
    )
    vitals = (
        charted
        + [
            {
                "code": "heart_rate",
                "value": 90.0 + h,
                "unit": "/min",
                "charted_time": admit + timedelta(hours=6 + h),
                "stored_time": admit + timedelta(hours=6 + h, minutes=5),
            }
            for h in range(n_vitals)
        ]
        + [
            {
                "code": "temperature",
                "value": 101.3,
                "unit": "[degF]",
                "charted_time": admit + timedelta(hours=12),
                "stored_time": admit + timedelta(hours=12, minutes=1),
            }
        ]
    )
    return hook_request(
        hook="patient-view",
        patient={"birth_date": birth, "sex": "F"},
        encounter={"admit_time": admit, "admission_type": "EMERGENCY", "unit": unit},
        labs=labs,
        vitals=vitals,
        tz=UTC_TZ,
        patient_id="pat-4711",
        encounter_id="enc-0815",
    )


@pytest.fixture(scope="session")
def site_mapping():
    return load_site_mapping()
