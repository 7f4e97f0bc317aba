"""Authenticating the EHR as CDS Hooks 2.0 requires: a JWT signed by a trusted CDS Client on every call.

Checked: the issuer is on the allowlist (with its own JWK Set, from a file or a URL configured by the site,
never from the token: a ``jku`` header must name the issuer's configured URL), the signature (ES384/RS384 as
the specification names, ES256/RS256 also accepted; never ``none`` or a shared secret), ``aud`` is this
service's URL, ``exp`` and ``iat`` are present and the token lives at most ``max_lifetime_s``, ``jti`` is
present and never seen before from that issuer (replay), and ``sub`` is on the issuer's list when it has one.
Every refusal is an :class:`AuthError` with a reason code (HTTP 401); no claim value is ever put in a message.
"""

import base64
import json
import re
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import yaml

ALGORITHMS = ("ES384", "RS384", "ES256", "RS256")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
_ALGORITHMS = {name: jwt.algorithms.get_default_algorithms()[name] for name in ALGORITHMS}


def _segment(text: str) -> bytes:
    """A base64url segment of a JWT (unpadded), strictly: any other character is refused (ValueError)."""
    if _BASE64URL.fullmatch(text) is None:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _seconds(value: Any) -> int | None:
    """A NumericDate claim as PyJWT reads it (``int()``), None where it is not one."""
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (ValueError, TypeError, OverflowError):
        return None


class AuthError(Exception):
    """The request is not from a trusted CDS Client (HTTP 401); ``reason`` is a code, never a value."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TrustConfigError(ValueError):
    """The trusted-issuer file cannot be used (the message names the file and the field)."""


@dataclass(frozen=True)
class TrustedIssuer:
    """One EHR allowed to call the service: its ``iss``, where its public keys are, its client ids."""

    iss: str
    jwks: dict | None = None  # a JWK Set, inline or read from a file
    jwks_url: str | None = None
    subjects: tuple[str, ...] = ()


def load_trust(path: Path | str) -> list[TrustedIssuer]:
    """Trusted issuers from a YAML or JSON file::

    issuers:
      - iss: https://ehr.hospital.example
        jwks_file: /etc/clinical-ml/ehr-jwks.json   # or jwks_url: https://ehr.hospital.example/jwks
        subjects: [cds-client-1]                     # optional: allowed client ids (sub)
    """
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise TrustConfigError(f"{p}: cannot be read ({type(exc).__name__})") from None
    entries = raw.get("issuers") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise TrustConfigError(f"{p}: expected 'issuers:' with at least one entry")
    out = []
    for i, e in enumerate(entries):
        where = f"{p}: issuers.{i}"
        if not isinstance(e, dict) or not isinstance(e.get("iss"), str) or not e["iss"]:
            raise TrustConfigError(f"{where}.iss: required")
        jwks = None
        if "jwks_file" in e:
            f = Path(e["jwks_file"])
            f = f if f.is_absolute() else p.parent / f
            try:
                jwks = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise TrustConfigError(f"{where}.jwks_file: cannot be read ({type(exc).__name__})") from None
        elif isinstance(e.get("jwks"), dict):
            jwks = e["jwks"]
        if jwks is None and not e.get("jwks_url"):
            raise TrustConfigError(f"{where}: give jwks_file, jwks or jwks_url")
        if jwks is not None and not isinstance(jwks.get("keys"), list):
            raise TrustConfigError(f"{where}: a JWK Set needs 'keys'")
        out.append(
            TrustedIssuer(
                iss=e["iss"],
                jwks=jwks,
                jwks_url=e.get("jwks_url"),
                subjects=tuple(str(s) for s in e.get("subjects", ())),
            )
        )
    return out


@dataclass
class _Replay:
    """``jti`` values seen per issuer until their token expires (bounded: the oldest are pruned)."""

    max_entries: int = 100_000
    seen: dict[tuple[str, str], float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def first_use(self, iss: str, jti: str, exp: float, now: float) -> bool:
        with self.lock:
            if len(self.seen) >= self.max_entries:
                self.seen = {k: v for k, v in self.seen.items() if v >= now}
                while len(self.seen) >= self.max_entries:
                    self.seen.pop(next(iter(self.seen)))
            key = (iss, jti)
            if key in self.seen and self.seen[key] >= now:
                return False
            self.seen[key] = exp
            return True


class SharedReplay:
    """``jti`` values seen per issuer until their token expires, in a SQLite file: shared by every process of
    the service (uvicorn workers) and kept across restarts, so a token is accepted once, whichever process
    it reaches. Each check is one statement (an insert, or the update of an expired entry); expired entries
    are pruned now and then."""

    PRUNE_EVERY = 1000

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS used (iss TEXT, jti TEXT, exp REAL, PRIMARY KEY (iss, jti)) WITHOUT ROWID"
        )
        self._lock = threading.Lock()
        self._checks = 0

    def first_use(self, iss: str, jti: str, exp: float, now: float) -> bool:
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO used VALUES (?, ?, ?) ON CONFLICT (iss, jti) DO UPDATE SET exp = excluded.exp "
                "WHERE used.exp < ?",
                (iss, jti, exp, now),
            )
            self._checks += 1
            if self._checks % self.PRUNE_EVERY == 0:
                self._db.execute("DELETE FROM used WHERE exp < ?", (now,))
            return cur.rowcount == 1


class JwtVerifier:
    """Verifies the CDS Client's bearer JWT of one request (see the module docstring)."""

    def __init__(
        self,
        issuers: Sequence[TrustedIssuer],
        *,
        leeway_s: float = 30.0,
        max_lifetime_s: float = 300.0,
        clock: Any = time.time,
        replay: "_Replay | SharedReplay | None" = None,
    ) -> None:
        self.issuers = {i.iss: i for i in issuers}
        self.leeway_s = leeway_s
        self.max_lifetime_s = max_lifetime_s
        self.clock = clock
        # the tokens already used: in this process's memory unless a store shared by the workers is given
        self._replay = replay if replay is not None else _Replay()
        self._key_sets: dict[str, jwt.PyJWKSet] = {}
        self._clients: dict[str, jwt.PyJWKClient] = {}
        for i in issuers:
            if i.jwks is not None:
                try:
                    self._key_sets[i.iss] = jwt.PyJWKSet.from_dict(i.jwks)
                except jwt.PyJWTError as exc:
                    raise TrustConfigError(
                        f"the JWK Set of a trusted issuer is unusable ({type(exc).__name__})"
                    ) from None
            elif i.jwks_url:
                self._clients[i.iss] = jwt.PyJWKClient(i.jwks_url, cache_keys=True, lifespan=3600)

    def _key(self, issuer: TrustedIssuer, header: dict) -> Any:
        kid = header.get("kid")
        jku = header.get("jku")
        if jku is not None and jku != issuer.jwks_url:
            raise AuthError("untrusted_jku")
        try:
            if issuer.iss in self._key_sets:
                keys = self._key_sets[issuer.iss]
                if kid is None:
                    if len(keys.keys) != 1:
                        raise AuthError("no_kid")
                    return keys.keys[0].key
                return keys[kid].key
            if kid is None:
                raise AuthError("no_kid")
            return self._clients[issuer.iss].get_signing_key(kid).key
        except KeyError:
            raise AuthError("unknown_key") from None
        except jwt.PyJWKClientError:
            raise AuthError("keys_unavailable") from None

    def verify(self, authorization: str | None, *, audience: Sequence[str]) -> dict:
        """The token's claims when the request is from a trusted CDS Client.

        Raises
        ------
        AuthError
            ``no_token``, ``malformed_token``, ``unknown_issuer``, ``untrusted_jku``, ``no_kid``,
            ``unknown_key``, ``keys_unavailable``, ``bad_signature``, ``expired``, ``wrong_audience``,
            ``missing_claim``, ``lifetime_too_long``, ``not_yet_valid``, ``replayed_token``,
            ``unknown_subject``.
        """
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("no_token")
        # the token read once (PyJWT's reading, then its checks, cost a fifth of the signature's time again):
        # the compact form, strictly three base64url segments of JSON objects; what PyJWT refuses is refused
        try:
            header_segment, payload_segment, signature_segment = token.strip().split(".")
            signing_input = f"{header_segment}.{payload_segment}".encode("ascii")
            header = json.loads(_segment(header_segment))
            unverified = json.loads(_segment(payload_segment))
            signature = _segment(signature_segment)
        except (ValueError, RecursionError):  # binascii.Error, UnicodeError and JSONDecodeError included
            raise AuthError("malformed_token") from None
        if not isinstance(header, dict) or not isinstance(unverified, dict):
            raise AuthError("malformed_token")
        if "kid" in header and not isinstance(header["kid"], str):
            raise AuthError("malformed_token")
        if "crit" in header or header.get("b64", True) is not True:  # no extension is understood here
            raise AuthError("malformed_token")
        iss = unverified.get("iss")
        issuer = self.issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise AuthError("unknown_issuer")
        alg = header.get("alg")
        algorithm = _ALGORITHMS.get(alg) if isinstance(alg, str) else None
        if algorithm is None:
            raise AuthError("bad_signature")
        key = self._key(issuer, header)
        try:
            if not algorithm.verify(signing_input, algorithm.prepare_key(key), signature):
                raise AuthError("bad_signature")
        except (jwt.PyJWTError, TypeError, ValueError):  # a key of another type than the algorithm's
            raise AuthError("bad_signature") from None
        claims = unverified
        now = self.clock()
        for name in ("iss", "aud", "exp", "iat", "jti"):
            if claims.get(name) is None:
                raise AuthError("missing_claim")
        exp, iat = _seconds(claims["exp"]), _seconds(claims["iat"])
        nbf = _seconds(claims["nbf"]) if "nbf" in claims else None
        if iat is None or exp is None or ("nbf" in claims and nbf is None):
            raise AuthError("malformed_token")
        if iat > now + self.leeway_s or (nbf is not None and nbf > now + self.leeway_s):
            raise AuthError("not_yet_valid")
        if exp <= now - self.leeway_s:
            raise AuthError("expired")
        aud = claims["aud"]
        if not aud:
            raise AuthError("missing_claim")
        aud = [aud] if isinstance(aud, str) else aud
        if not isinstance(aud, list) or not aud or any(not isinstance(a, str) for a in aud):
            raise AuthError("wrong_audience")
        if all(a not in aud for a in audience):
            raise AuthError("wrong_audience")
        if "sub" in claims and not isinstance(claims["sub"], str):
            raise AuthError("malformed_token")
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti:
            raise AuthError("missing_claim")
        if float(exp) - float(iat) > self.max_lifetime_s + self.leeway_s:
            raise AuthError("lifetime_too_long")
        if issuer.subjects and claims.get("sub") not in issuer.subjects:
            raise AuthError("unknown_subject")
        if not self._replay.first_use(issuer.iss, jti, float(exp) + self.leeway_s, now):
            raise AuthError("replayed_token")
        return claims
