"""Small helpers shared by the stage modules of one use case."""

from collections.abc import Sequence

import dagster as dg

from clinical_ml.core.usecase import UseCase


def use_case_key(uc: UseCase, name: str) -> dg.AssetKey:
    return dg.AssetKey([uc.name, name])


def md_table(rows: Sequence[tuple[str, object]]) -> str:
    return "| | |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows)
