"""The Dagster code location (``dagster dev`` and ``dg`` load this module)."""

from clinical_ml.defs.build import build_definitions

defs = build_definitions()
