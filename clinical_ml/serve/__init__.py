"""The point-of-care service: CDS Hooks 2.0 over the champion of each use case (``clinical-ml serve``).

Logic that is not HTTP lives in plain modules (:mod:`clinical_ml.serve.chart`, :mod:`.models`, :mod:`.cards`,
:mod:`.auth`, :mod:`.records`); :mod:`clinical_ml.serve.app` only wires them into FastAPI routes.
"""
