"""The Dagster code location (``dagster dev`` and ``dg`` load this module).

It shows the use cases written for the data it runs on: ``$CLINICAL_ML_DATA`` (``synthetic`` by default;
``eicu``, ``mimic`` or a hospital's own name, as in ``make dev DATA=eicu``), so that no asset shows in the UI
that this location's data cannot materialize; ``all`` shows every use case of the folder.
"""

import os

from clinical_ml.defs.build import build_definitions

_data = os.environ.get("CLINICAL_ML_DATA") or "synthetic"
defs = build_definitions(data=None if _data == "all" else _data)
