"""Where one use case keeps its files, and small helpers shared by its stage modules."""

from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from clinical_ml.core.modeling import TrainedModel, load_model
from clinical_ml.core.storage import read_json
from clinical_ml.core.usecase import UseCase
from clinical_ml.resources.zones import DataZones


@dataclass(frozen=True)
class UseCasePaths:
    """Files of one use case, relative to the zones."""

    name: str

    def deid(self, zones: DataZones, file: str) -> Path:
        return zones.deid / "usecases" / self.name / file

    def reports(self, zones: DataZones, file: str) -> Path:
        return zones.reports / self.name / file

    def registry(self, zones: DataZones) -> Path:
        return zones.registry


def use_case_key(uc: UseCase, name: str) -> dg.AssetKey:
    return dg.AssetKey([uc.name, name])


def load_challenger(paths: UseCasePaths, zones: DataZones) -> tuple[TrainedModel, dict]:
    d = paths.deid(zones, "challenger")
    return load_model((d / "model.txt").read_text()), read_json(d / "fit.json")


def md_table(rows: list[tuple[str, object]]) -> str:
    return "| | |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows)
