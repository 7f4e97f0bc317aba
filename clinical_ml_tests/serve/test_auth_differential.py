"""The service reads and checks the EHR's JWT itself (clinical_ml/serve/auth.py: one parse instead of PyJWT's
two) but must decide as PyJWT's ``jwt.decode`` with the CDS Hooks rules would: Hypothesis signs tokens with
odd headers and claims (wrong types, missing, expired, not yet valid, other audiences, other algorithms named
in the header) and both verdicts, accepted or refused, must agree, except where the service is stricter on
purpose (:func:`_as_the_rfcs_type_it`). The verifier may only
ever answer with claims or an AuthError (a 401), never another exception (a 500).
"""

import base64
import json
import time
from dataclasses import dataclass

import jwt
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from clinical_ml.serve.auth import ALGORITHMS, AuthError, JwtVerifier, TrustedIssuer
from clinical_ml_tests.serve.conftest import ISSUER, Ehr

AUD = "https://cds.example.test/cds-services/icu_mortality_24h"
SUBJECT = "cds-client"
LEEWAY = 30
MAX_LIFETIME = 300
ABSENT = object()

odd = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12),
    st.text(max_size=8),
    st.lists(st.text(max_size=4), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=1),
)


@dataclass(frozen=True)
class At:
    """A time ``seconds`` from the moment the token is checked, written as ``kind`` (PyJWT's checks read the
    clock themselves, so times are made when the example runs, not when the module is imported)."""

    seconds: float
    kind: type = int

    def value(self, now: int) -> object:
        return self.kind(now + self.seconds)


GOOD_CLAIMS = {
    "iss": ISSUER,
    "aud": AUD,
    "iat": At(0),
    "exp": At(60),
    "nbf": At(-10),
    "jti": "j1",
    "sub": SUBJECT,
}
GOOD_HEADER = {"alg": "ES384", "kid": "ehr-key-1", "typ": "JWT"}
HEADER_NAMES = ("alg", "kid", "typ", "crit", "b64")
OTHER_VALUES = {
    "iss": ["https://evil.example"],
    "aud": [[AUD], ["https://other.example", AUD], "https://other.example", "1796630944", [AUD, 7]],
    "iat": [At(-100), At(1000), At(0, str), At(0, float), At(20)],
    "exp": [At(-100), At(-20), At(10_000), At(60, str), At(60.5, float)],
    "nbf": [At(1000), At(20), "soon"],
    "jti": [""],
    "sub": ["somebody"],
    "alg": ["ES256", "RS384", "HS256", "none", "es384"],
    "kid": ["other-key"],
    "typ": ["at+jwt"],
    "crit": [["exp"]],
    "b64": [False, True],
}


@st.composite
def tokens(draw: st.DrawFn) -> tuple[dict, dict]:
    """A good header and claim set with up to three entries changed: to another value of the kind a real
    token could hold, to a value of the wrong type, or removed."""
    header, claims = dict(GOOD_HEADER), dict(GOOD_CLAIMS)
    for name in draw(st.sets(st.sampled_from(sorted(OTHER_VALUES)), max_size=3)):
        target = header if name in HEADER_NAMES else claims
        target[name] = draw(st.one_of(st.sampled_from([*OTHER_VALUES[name], ABSENT]), odd))
    return _present(header), _present(claims)


def _present(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not ABSENT}


def _segment(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def _signed(header: dict, claims: dict, ehr: Ehr) -> str:
    """A compact JWS signed with the EHR's key by ES384 whatever its header says (PyJWT's encoder would
    refuse to write most of these headers)."""
    signing_input = f"{_segment(header)}.{_segment(claims)}"
    es384 = jwt.algorithms.get_default_algorithms()["ES384"]
    signature = es384.sign(signing_input.encode(), ehr.key)
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def _as_the_rfcs_type_it(header: dict, claims: dict) -> bool:
    """Where the service is stricter than PyJWT, on purpose: a NumericDate is a JSON number (RFC 7519), and
    PyJWT reads ``true`` as 1; no JWS extension (RFC 7515 ``crit``, RFC 7797 ``b64``) is understood here."""
    dates_are_numbers = not any(isinstance(claims.get(n), bool) for n in ("exp", "iat", "nbf"))
    return dates_are_numbers and "crit" not in header and header.get("b64", True) is True


def _pyjwt_accepts(token: str, header: dict, ehr: Ehr) -> bool:
    """PyJWT's decision with this service's rules (the checks the service had before it read tokens itself):
    the key is the trusted issuer's key named by ``kid`` (its only key when no kid is given)."""
    if "kid" in header and header["kid"] != ehr.kid:
        return False
    try:
        claims = jwt.decode(
            token,
            ehr.key.public_key(),
            algorithms=list(ALGORITHMS),
            audience=[AUD],
            issuer=ISSUER,
            leeway=LEEWAY,
            options={"require": ["iss", "aud", "exp", "iat", "jti"]},
        )
    except Exception:  # PyJWT's refusals, and the few inputs it fails on (e.g. an unhashable alg)
        return False
    return (
        isinstance(claims["jti"], str)
        and bool(claims["jti"])
        and float(claims["exp"]) - float(claims["iat"]) <= MAX_LIFETIME + LEEWAY
        and claims.get("sub") == SUBJECT
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(token_parts=tokens())
def test_the_service_accepts_exactly_the_tokens_pyjwt_accepts(
    ehr: Ehr, token_parts: tuple[dict, dict]
) -> None:
    now = int(time.time())  # the boundaries tried are 10 s or more from a limit: PyJWT's clock may be later
    header, claims = token_parts
    claims = {k: v.value(now) if isinstance(v, At) else v for k, v in claims.items()}
    token = _signed(header, claims, ehr)
    verifier = JwtVerifier(
        [TrustedIssuer(ISSUER, jwks=ehr.jwks(), subjects=(SUBJECT,))],
        leeway_s=LEEWAY,
        max_lifetime_s=MAX_LIFETIME,
        clock=lambda: now,
    )
    try:
        verifier.verify(f"Bearer {token}", audience=[AUD])
        ours = True
    except AuthError:
        ours = False
    theirs = _pyjwt_accepts(token, header, ehr) and _as_the_rfcs_type_it(header, claims)
    event("accepted" if theirs else "refused")
    assert ours == theirs


@pytest.mark.parametrize("segment", [0, 1, 2])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.text(max_size=40))
def test_any_text_in_a_segment_is_refused_with_a_401_reason(ehr: Ehr, segment: int, junk: str) -> None:
    parts = ehr.token(AUD).split(".")
    parts[segment] = junk
    verifier = JwtVerifier([TrustedIssuer(ISSUER, jwks=ehr.jwks(), subjects=(SUBJECT,))])
    with pytest.raises(AuthError):
        verifier.verify("Bearer " + ".".join(parts), audience=[AUD])
