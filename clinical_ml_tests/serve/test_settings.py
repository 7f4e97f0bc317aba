"""Unsafe settings are refused before the service starts; the command says why and exits 2."""

import pytest

from clinical_ml.cli import main
from clinical_ml.serve.settings import SettingsError, is_loopback, settings_from_env


def test_settings_come_from_the_environment(tmp_path) -> None:
    s = settings_from_env(
        {
            "CLINICAL_ML_DATA_ROOT": str(tmp_path),
            "CLINICAL_ML_SERVE_URL": "https://cds.example/",
            "CLINICAL_ML_SERVE_TRUST": "/etc/trust.yaml",
            "CLINICAL_ML_SERVE_MAX_BODY_BYTES": "5000",
        }
    )
    assert (s.base_url, s.max_body_bytes, s.auth, s.data_root) == (
        "https://cds.example",
        5000,
        "jwt",
        tmp_path,
    )
    s.check(host="0.0.0.0")


@pytest.mark.parametrize(
    ("env", "host", "message"),
    [
        ({"CLINICAL_ML_SERVE_AUTH": "off"}, "0.0.0.0", "only allowed on a loopback"),
        ({}, "127.0.0.1", "CLINICAL_ML_SERVE_TRUST must name"),
        ({"CLINICAL_ML_SERVE_AUTH": "maybe"}, "127.0.0.1", "must be 'jwt' or 'off'"),
        ({"CLINICAL_ML_SERVE_TRUST": "t", "CLINICAL_ML_SITE_TIMEZONE": "Mars/Olympus"}, "::1", "IANA"),
    ],
)
def test_unsafe_settings_are_refused(env: dict, host: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        settings_from_env(env, host=host).check(host=host)


def test_loopback_addresses() -> None:
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "10.0.0.5", "0.0.0.0")] == [
        True,
        True,
        True,
        False,
        False,
    ]


def test_the_command_refuses_auth_off_on_a_public_address(monkeypatch, capsys) -> None:
    monkeypatch.setenv("CLINICAL_ML_SERVE_AUTH", "off")
    assert main(["serve", "--host", "0.0.0.0", "--port", "8099"]) == 2
    assert "loopback" in capsys.readouterr().err


def test_the_asgi_factory_never_runs_without_authentication(monkeypatch) -> None:
    from clinical_ml.serve.app import app_from_env

    monkeypatch.setenv("CLINICAL_ML_SERVE_AUTH", "off")
    with pytest.raises(SettingsError, match="loopback"):
        app_from_env()
