"""Where the project's data root and use-case folder are: resolved here, once, for every entry point.

The definitions builder, the command line and the replay tool all call these two functions, so an explicit
argument, then the environment, then the project's own folder decide the same way everywhere.
"""

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DATA_ROOT_ENV = "CLINICAL_ML_DATA_ROOT"
USECASES_ENV = "CLINICAL_ML_USECASES"


def resolve_data_root(explicit: str | Path | None = None) -> Path:
    """The data root: ``explicit``, else ``$CLINICAL_ML_DATA_ROOT``, else ``<project>/data`` (absolute)."""
    return Path(explicit or os.environ.get(DATA_ROOT_ENV) or PROJECT_ROOT / "data").resolve()


def resolve_usecases_dir(explicit: str | Path | None = None) -> Path:
    """The use-case folder: ``explicit``, else ``$CLINICAL_ML_USECASES``, else ``<project>/usecases``."""
    return Path(explicit or os.environ.get(USECASES_ENV) or PROJECT_ROOT / "usecases").resolve()


def monitoring_config_file(usecases_dir: Path, use_case: str) -> Path:
    """``<usecases>/monitoring/<name>.yaml``: the use-case contract forbids extra sections, so its monitoring
    levels live beside it in a file of their own (defaults when absent)."""
    return Path(usecases_dir) / "monitoring" / f"{use_case}.yaml"


def alerts_file(data_root: Path) -> Path:
    """The JSON-lines log every failed run appends an alert to (beside the zones, not in one)."""
    return Path(data_root) / "alerts" / "alerts.jsonl"
