"""The service's settings, from the environment (secrets and site specifics never live in code).

========================================  =====================================================================
``CLINICAL_ML_DATA_ROOT``                 data root (registry, reports and phi zones), as for the pipeline
``CLINICAL_ML_USECASES``                  use-case folder, as for the pipeline
``CLINICAL_ML_SERVE_URL``                 the service's public base URL, e.g. ``https://cds.hospital.example``:
                                          the JWT audience is ``<url>/cds-services[/<id>]`` and card links
                                          start with it
``CLINICAL_ML_SERVE_TRUST``               the trusted-issuer file (issuers and their JWK Sets, see
                                          :func:`clinical_ml.serve.auth.load_trust`); required
``CLINICAL_ML_SERVE_AUTH``                ``jwt`` (default) or ``off``: no authentication, refused unless the
                                          service listens on a loopback address (local trials only)
``CLINICAL_ML_SERVE_MAX_BODY_BYTES``      largest request body accepted (default 2 MB; larger: HTTP 413)
``CLINICAL_ML_SITE_TIMEZONE``             the site's clock (IANA name; default: the site mapping's
                                          ``time_zone``, else UTC): FHIR times are read on it, as the landing
                                          contract's naive times are
``CLINICAL_ML_SITE_MAPPING``              the site mapping recoding sex, admission type, unit and site
                                          (default ``default``)
``CLINICAL_ML_SERVE_CRITICAL_MULTIPLE``   a risk at or above this multiple of the operating threshold gets the
                                          ``critical`` indicator (default 2)
========================================  =====================================================================
"""

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from clinical_ml.core.locations import resolve_data_root, resolve_usecases_dir


class SettingsError(ValueError):
    """A setting that cannot be used (the message names the variable, never a secret)."""


@dataclass(frozen=True)
class ServiceSettings:
    data_root: Path
    usecases_dir: Path
    base_url: str
    trust_file: Path | None
    auth: str = "jwt"
    max_body_bytes: int = 2_000_000
    site_timezone: str | None = None
    site_mapping: str = "default"
    critical_multiple: float = 2.0

    def check(self, *, host: str) -> None:
        """Refuse settings that would run the service unsafely."""
        if self.auth not in ("jwt", "off"):
            raise SettingsError("CLINICAL_ML_SERVE_AUTH must be 'jwt' or 'off'")
        if self.auth == "off" and not is_loopback(host):
            raise SettingsError(
                "CLINICAL_ML_SERVE_AUTH=off is only allowed on a loopback address (127.0.0.1, ::1, localhost)"
            )
        if self.auth == "jwt" and self.trust_file is None:
            raise SettingsError(
                "CLINICAL_ML_SERVE_TRUST must name the trusted-issuer file (see docs/cds-hooks.md)"
            )
        if self.max_body_bytes < 1024:
            raise SettingsError("CLINICAL_ML_SERVE_MAX_BODY_BYTES must be at least 1024")
        try:
            if self.site_timezone is not None:
                ZoneInfo(self.site_timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise SettingsError("CLINICAL_ML_SITE_TIMEZONE is not an IANA time zone name") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def settings_from_env(
    env: Mapping[str, str] | None = None, *, host: str = "127.0.0.1", port: int = 8020
) -> ServiceSettings:
    e = os.environ if env is None else env
    try:
        max_body = int(e.get("CLINICAL_ML_SERVE_MAX_BODY_BYTES", "2000000"))
        critical = float(e.get("CLINICAL_ML_SERVE_CRITICAL_MULTIPLE", "2"))
    except ValueError:
        raise SettingsError(
            "CLINICAL_ML_SERVE_MAX_BODY_BYTES and _CRITICAL_MULTIPLE must be numbers"
        ) from None
    trust = e.get("CLINICAL_ML_SERVE_TRUST")
    return ServiceSettings(
        data_root=resolve_data_root(e.get("CLINICAL_ML_DATA_ROOT")),
        usecases_dir=resolve_usecases_dir(e.get("CLINICAL_ML_USECASES")),
        base_url=e.get("CLINICAL_ML_SERVE_URL", f"http://{host}:{port}").rstrip("/"),
        trust_file=Path(trust) if trust else None,
        auth=e.get("CLINICAL_ML_SERVE_AUTH", "jwt"),
        max_body_bytes=max_body,
        site_timezone=e.get("CLINICAL_ML_SITE_TIMEZONE") or None,
        site_mapping=e.get("CLINICAL_ML_SITE_MAPPING", "default"),
        critical_multiple=critical,
    )
