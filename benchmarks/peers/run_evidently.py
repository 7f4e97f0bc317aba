"""Evidently's default data drift preset on reference.parquet vs current.parquet (run in the peers venv).

Prints one JSON line: seconds, the columns Evidently calls drifted."""

import json
import sys
import time

import pandas as pd
from evidently import Report
from evidently.presets import DataDriftPreset

ref = pd.read_parquet(sys.argv[1])
cur = pd.read_parquet(sys.argv[2])
t = time.perf_counter()
snapshot = Report([DataDriftPreset()]).run(current_data=cur, reference_data=ref)
seconds = time.perf_counter() - t
drifted = []
for m in snapshot.dict()["metrics"]:
    name = m.get("metric_name", "") or m.get("metric_id", "")
    if "ValueDrift" in str(name):
        col = m.get("config", {}).get("column")
        thr = m.get("config", {}).get("threshold")
        val = m.get("value")
        method = str(m.get("config", {}).get("method", ""))
        # p-value methods drift when below the threshold, distance methods when at or above it
        is_p = "p_value" in method or "test" in method.lower()
        if val is not None and thr is not None and ((val < thr) if is_p else (val >= thr)):
            drifted.append(col)
# VmHWM, not ru_maxrss: on Linux a child's ru_maxrss starts from its parent's peak at fork
with open("/proc/self/status") as status:
    peak_rss_mb = next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "drifted": sorted(drifted), "peak_rss_mb": peak_rss_mb}))
