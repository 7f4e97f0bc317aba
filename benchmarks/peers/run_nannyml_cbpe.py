"""NannyML CBPE on reference/analysis predictions (run in the peers venv). Prints one JSON line per chunk."""

import json
import os
import sys
import time

os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
import nannyml as nml
import pandas as pd

ref = pd.read_parquet(sys.argv[1])
ana = pd.read_parquet(sys.argv[2])
chunk = int(sys.argv[3])
t = time.perf_counter()
est = nml.CBPE(
    y_pred_proba="p",
    y_pred="flag",
    y_true="y",
    problem_type="classification_binary",
    metrics=["roc_auc"],
    chunk_size=chunk,
)
est.fit(ref)
res = est.estimate(ana.drop(columns=["y"])).to_df()
seconds = time.perf_counter() - t
values = [float(v) for v in res[("roc_auc", "value")].tolist()]
print(json.dumps({"seconds": seconds, "estimates": values}))
