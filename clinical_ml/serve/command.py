"""``clinical-ml serve``: the CDS Hooks service under uvicorn (settings from the environment, see
:mod:`clinical_ml.serve.settings`). Imported by the command line at start-up: nothing heavy at module level."""

import argparse
import sys


def add_serve_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "serve",
        help="answer the EHR at the point of care: a CDS Hooks 2.0 service for every use case with an approved "
        "champion (settings from CLINICAL_ML_SERVE_* variables; see docs/cds-hooks.md)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8020, help="port (default 8020)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the port (default 1; about one per core: each runs Python on one core)",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from clinical_ml.core.usecase import UseCaseError
    from clinical_ml.serve.app import run
    from clinical_ml.serve.auth import TrustConfigError
    from clinical_ml.serve.settings import SettingsError, settings_from_env

    try:
        settings = settings_from_env(host=args.host, port=args.port)
        settings.check(host=args.host)
        run(settings, host=args.host, port=args.port, workers=args.workers)
    except (SettingsError, TrustConfigError, UseCaseError) as exc:
        print(f"clinical-ml: error: {exc}", file=sys.stderr)
        return 2
    return 0
