"""Where each data zone lives. Every asset finds its files through this resource."""

from pathlib import Path

import dagster as dg
from pydantic import Field

ZONES = ("landing", "archive", "quarantine", "phi", "deid", "registry", "reports")


class DataZones(dg.ConfigurableResource):
    """The data root and its zones (see DESIGN.md): landing, archive, quarantine, phi, deid, registry,
    reports. Only ingestion and anonymization may touch ``landing``, ``archive``, ``quarantine``, ``phi``."""

    root: str = Field(description="Folder holding every data zone; created on first use.")

    def zone(self, name: str) -> Path:
        if name not in ZONES:
            raise ValueError(f"unknown zone {name!r}")
        p = Path(self.root).resolve() / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def landing(self) -> Path:
        return self.zone("landing")

    @property
    def archive(self) -> Path:
        return self.zone("archive")

    @property
    def quarantine(self) -> Path:
        return self.zone("quarantine")

    @property
    def phi(self) -> Path:
        return self.zone("phi")

    @property
    def deid(self) -> Path:
        return self.zone("deid")

    @property
    def registry(self) -> Path:
        return self.zone("registry")

    @property
    def reports(self) -> Path:
        return self.zone("reports")
