"""Small helpers shared by the stage modules of one use case."""

from collections.abc import Sequence

import dagster as dg

from clinical_ml.core.usecase import UseCase


def use_case_key(uc: UseCase | str, stage: str) -> dg.AssetKey:
    """``<use case>/<use case>__<stage>``: the UI labels a node by the key's last part, so every use case's
    branch shows under its own name (``icu_mortality_24h__cohort``, not ``cohort`` twice); the first part
    keeps a use case's assets together in the catalog."""
    name = uc if isinstance(uc, str) else uc.name
    return dg.AssetKey([name, f"{name}__{stage}"])


def stage_of(key: dg.AssetKey) -> str:
    """The stage of a use case's asset key (``cohort``, ``batch_drift``...); a shared asset's own name."""
    return key.path[-1].removeprefix(f"{key.path[0]}__") if len(key.path) > 1 else key.path[-1]


def md_table(rows: Sequence[tuple[str, object]]) -> str:
    return "| | |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows)
