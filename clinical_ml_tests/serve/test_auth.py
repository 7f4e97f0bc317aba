"""Only a trusted EHR's fresh, signed, once-used token for this endpoint is accepted."""

import base64
import json
import time
import uuid

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from clinical_ml.serve.auth import (
    AuthError,
    JwtVerifier,
    SharedReplay,
    TrustConfigError,
    TrustedIssuer,
    load_trust,
)
from clinical_ml_tests.serve.conftest import ISSUER, Ehr

AUD = "https://cds.example.test/cds-services/icu_mortality_24h"


@pytest.fixture
def verifier(ehr: Ehr) -> JwtVerifier:
    return JwtVerifier([TrustedIssuer(ISSUER, jwks=ehr.jwks(), subjects=("cds-client",))])


def _reason(verifier: JwtVerifier, header: str | None, aud: str = AUD) -> str:
    with pytest.raises(AuthError) as exc:
        verifier.verify(header, audience=[aud])
    return exc.value.reason


def test_a_good_token_is_accepted_once(verifier: JwtVerifier, ehr: Ehr) -> None:
    token = ehr.token(AUD)
    assert verifier.verify(f"Bearer {token}", audience=[AUD])["iss"] == ISSUER
    assert _reason(verifier, f"Bearer {token}") == "replayed_token"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda e: None, "no_token"),
        (lambda e: "Basic abc", "no_token"),
        (lambda e: "Bearer not.a.jwt", "malformed_token"),
        (lambda e: "Bearer " + e.token(AUD, iss="https://evil.example"), "unknown_issuer"),
        (lambda e: "Bearer " + e.token("https://cds.example.test/cds-services/other"), "wrong_audience"),
        (lambda e: "Bearer " + e.token(AUD, lifetime=-120), "expired"),
        (lambda e: "Bearer " + e.token(AUD, lifetime=3600), "lifetime_too_long"),
        (lambda e: "Bearer " + e.token(AUD, sub="somebody"), "unknown_subject"),
    ],
)
def test_refusals_carry_a_reason_code(verifier: JwtVerifier, ehr: Ehr, make, reason: str) -> None:
    assert _reason(verifier, make(ehr)) == reason


def test_a_token_signed_by_another_key_is_refused(verifier: JwtVerifier) -> None:
    other = Ehr(ec.generate_private_key(ec.SECP384R1()), "ehr-key-1")  # same kid, wrong key
    assert _reason(verifier, "Bearer " + other.token(AUD)) == "bad_signature"


def test_shared_secret_and_unsigned_tokens_are_refused(verifier: JwtVerifier) -> None:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUD, "iat": now, "exp": now + 60, "jti": str(uuid.uuid4())}
    hs = jwt.encode(claims, "a-shared-secret-of-32-bytes-or-more!!", algorithm="HS256")
    assert _reason(verifier, f"Bearer {hs}") == "bad_signature"
    unsigned = jwt.encode(claims, None, algorithm="none")
    assert _reason(verifier, f"Bearer {unsigned}") == "bad_signature"


def test_a_jku_other_than_the_configured_one_is_refused(verifier: JwtVerifier, ehr: Ehr) -> None:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUD, "iat": now, "exp": now + 60, "jti": str(uuid.uuid4())}
    token = jwt.encode(
        claims, ehr.key, algorithm="ES384", headers={"kid": ehr.kid, "jku": "https://evil/jwks"}
    )
    assert _reason(verifier, f"Bearer {token}") == "untrusted_jku"


def test_missing_jti_is_refused(verifier: JwtVerifier, ehr: Ehr) -> None:
    now = int(time.time())
    token = jwt.encode(
        {"iss": ISSUER, "aud": AUD, "iat": now, "exp": now + 60},
        ehr.key,
        algorithm="ES384",
        headers={"kid": ehr.kid},
    )
    assert _reason(verifier, f"Bearer {token}") == "missing_claim"


def test_trust_file_errors_name_the_field(tmp_path, ehr: Ehr) -> None:
    bad = tmp_path / "trust.yaml"
    bad.write_text("issuers:\n  - iss: https://ehr\n")
    with pytest.raises(TrustConfigError, match=r"issuers.0: give jwks_file"):
        load_trust(bad)
    (tmp_path / "k.json").write_text(json.dumps(ehr.jwks()))
    bad.write_text("issuers:\n  - iss: https://ehr\n    jwks_file: k.json\n")
    assert load_trust(bad)[0].jwks == ehr.jwks()


def test_a_token_is_accepted_once_whichever_process_checks_it(tmp_path, ehr: Ehr) -> None:
    """Two verifiers on one replay file stand for two worker processes of the service."""
    issuers = [TrustedIssuer(ISSUER, jwks=ehr.jwks(), subjects=("cds-client",))]
    first = JwtVerifier(issuers, replay=SharedReplay(tmp_path / "used.sqlite"))
    second = JwtVerifier(issuers, replay=SharedReplay(tmp_path / "used.sqlite"))
    token = ehr.token(AUD)
    assert first.verify(f"Bearer {token}", audience=[AUD])["aud"] == AUD
    assert _reason(second, f"Bearer {token}") == "replayed_token"
    assert _reason(first, f"Bearer {token}") == "replayed_token"
    # an entry whose token has expired no longer blocks its id (the token itself is refused as expired)
    store = SharedReplay(tmp_path / "used.sqlite")
    assert store.first_use(ISSUER, "j1", exp=100.0, now=50.0)
    assert not store.first_use(ISSUER, "j1", exp=100.0, now=60.0)
    assert store.first_use(ISSUER, "j1", exp=300.0, now=200.0)


def _signed(ehr: Ehr, claims: dict, headers: dict | None = None) -> str:
    return "Bearer " + jwt.encode(
        claims, ehr.key, algorithm="ES384", headers={"kid": ehr.kid, **(headers or {})}
    )


@pytest.mark.parametrize(
    ("change", "headers", "reason"),
    [
        ({"exp": "soon"}, None, "malformed_token"),
        ({"iat": None}, None, "missing_claim"),
        ({"nbf": "later"}, None, "malformed_token"),
        ({"nbf": 10**10}, None, "not_yet_valid"),
        ({"iat": 10**10, "exp": 10**10 + 60}, None, "not_yet_valid"),
        ({"aud": ""}, None, "missing_claim"),
        ({"aud": [AUD, 7]}, None, "wrong_audience"),
        ({"aud": ["https://elsewhere.example"]}, None, "wrong_audience"),
        ({"sub": 5}, None, "malformed_token"),
        ({}, {"crit": ["exp"], "exp": 1}, "malformed_token"),
    ],
)
def test_claims_and_headers_are_checked_as_the_jwt_rules_say(
    verifier: JwtVerifier, ehr: Ehr, change: dict, headers: dict | None, reason: str
) -> None:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUD, "iat": now, "exp": now + 60, "jti": str(uuid.uuid4()), **change}
    assert _reason(verifier, _signed(ehr, claims, headers)) == reason


def test_a_token_in_a_list_of_audiences_or_with_odd_segments(verifier: JwtVerifier, ehr: Ehr) -> None:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": ["https://other.example", AUD],
        "iat": now,
        "exp": now + 60,
        "jti": "j1",
        "sub": "cds-client",
    }
    assert verifier.verify(_signed(ehr, claims), audience=[AUD])["jti"] == "j1"
    token = _signed(ehr, {**claims, "jti": "j2"})
    assert _reason(verifier, token + ".x") == "malformed_token"  # four segments
    assert _reason(verifier, token.replace(".", ".+", 1)) == "malformed_token"  # not base64url


@pytest.mark.parametrize("alg", [["ES384"], {"x": 1}, None, 5])
def test_an_alg_that_is_not_a_name_is_refused(verifier: JwtVerifier, ehr: Ehr, alg) -> None:
    signed = _signed(ehr, {"iss": ISSUER, "aud": AUD, "iat": 0, "exp": 60, "jti": "j"}).removeprefix(
        "Bearer "
    )
    _, payload, signature = signed.split(".")
    header = base64.urlsafe_b64encode(json.dumps({"alg": alg, "kid": ehr.kid}).encode()).rstrip(b"=").decode()
    assert _reason(verifier, f"Bearer {header}.{payload}.{signature}") == "bad_signature"
