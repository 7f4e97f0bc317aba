"""Where each data zone lives. Every asset finds its files through the typed stores this resource hands out."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from clinical_ml.core.artifacts import DeidStore, PhiStore, UseCaseStore
from clinical_ml.core.registry import Registry

ZONES = ("landing", "archive", "quarantine", "phi", "deid", "registry", "reports")


class DataZones(dg.ConfigurableResource):
    """The data root and its zones (see DESIGN.md): landing, archive, quarantine, phi, deid, registry,
    reports. Only ingestion and anonymization may touch ``landing``, ``archive``, ``quarantine``, ``phi``."""

    root: str = Field(description="Folder holding every data zone; created on first use.")
    max_file_bytes: int = Field(
        default=4 << 30, description="Largest delivered file accepted in the landing zone (bytes)."
    )
    max_zip_uncompressed_bytes: int = Field(
        default=8 << 30, description="Largest decompressed member of a zipped delivery (bytes)."
    )
    max_zip_ratio: float = Field(
        default=200.0, description="Largest decompressed/compressed ratio of a zip member (zip bomb guard)."
    )
    unmarked_batch_quiet_seconds: float = Field(
        default=120.0,
        description="A batch folder without a _SUCCESS marker is read once its files' sizes and times stayed "
        "the same across two sensor checks and for this long.",
    )
    stuck_batch_seconds: float = Field(
        default=3600.0,
        description="A batch folder the landing sensor has seen but not started for this long (a broken or "
        "missing _SUCCESS marker, listed files absent or of another size, files that never stop changing) is "
        "reported once per reason: a sensor log line and an alert in <data root>/alerts/alerts.jsonl.",
    )

    site_mappings_dir: str | None = Field(
        default=None,
        description="Folder of the site mapping files (<name>.yaml; a batch's _SUCCESS marker names its mapping, "
        "else default.yaml). Unset: $CLINICAL_ML_SITE_MAPPINGS, else the project's site_mappings/.",
    )
    max_unmapped_share: float = Field(
        default=0.05,
        description="Share of a coded field (sex, race, ethnicity, admission type, unit, site, disposition) "
        "that the site mapping may leave unmapped or send to Other/Unknown before the WARN check "
        "coded_values_mapped fails.",
    )

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

    def phi_store(self) -> PhiStore:
        return PhiStore(self.phi)

    def deid_store(self) -> DeidStore:
        return DeidStore(self.deid, self.reports)

    def use_case(self, name: str) -> UseCaseStore:
        """The artifacts of one use case (de-identified tables and reports)."""
        return self.deid_store().use_case(name)

    def model_registry(self, use_case: str) -> Registry:
        """The model registry of one use case: models, cards, champion pointer, decisions."""
        return Registry(self.registry, use_case)
