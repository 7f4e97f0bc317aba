"""Subgroup table with bootstrap CIs vs fairlearn ``MetricFrame(n_boot=...)``, side by side on the same data.

Data: seeded validation predictions (calibrated risks, ~12% events) for ``n`` patients in 40 intersectional
groups (sex x race/ethnicity x age band). Both sides compute sensitivity, specificity, PPV and NPV per group
with 95% bootstrap intervals; ours also computes AUROC (DeLong), prevalence, O/E and calibration slope and the
disparities.

Rows
----
1. **Same data, same replicates** (no extrapolation): both at ``n_same`` rows with ``boot_same`` replicates.
2. **The issue's scale**: ours at ``n`` rows with 1000 replicates; fairlearn at the same ``n`` rows with
   ``boot_fl`` replicates, its time *extrapolated linearly to 1000 replicates*: fairlearn's bootstrap builds
   one MetricFrame per replicate, so its cost is the point-estimate MetricFrame (measured) plus 1000 times
   the per-replicate cost (measured as the difference, divided by ``boot_fl``); the measured times and the
   factor are in ``extra``.
3. **AUROC intervals need the rows**: DeLong (ours, default) vs a stratified row bootstrap of each group
   (``auroc_ci="bootstrap"``), measured separately, at ``n_auc`` rows and ``boot_auc`` replicates.
"""

import time
from pathlib import Path

import numpy as np
import pandas as pd

from clinical_ml.core.fairness import reference_metric_frame, subgroup_table

SCALES = {
    # rows for ours, rows and replicates of the same-data row, fairlearn replicates at full scale, AUROC row
    "small": {"n": 100_000, "n_same": 20_000, "boot_same": 5, "boot_fl": 1, "n_auc": 20_000, "boot_auc": 200},
    "default": {
        "n": 1_000_000,
        "n_same": 100_000,
        "boot_same": 10,
        "boot_fl": 2,
        "n_auc": 100_000,
        "boot_auc": 1000,
    },
}


def _predictions(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    groups = pd.DataFrame(
        {
            "sex": rng.choice(np.array(["Female", "Male"]), n),
            "race_ethnicity": rng.choice(
                np.array(["White", "Black", "Asian", "Hispanic", "Other"]), n, p=[0.6, 0.16, 0.08, 0.1, 0.06]
            ),
            "age_band": rng.choice(np.array(["18-44", "45-64", "65-79", "80+"]), n, p=[0.2, 0.3, 0.3, 0.2]),
        }
    )
    p = 1 / (1 + np.exp(-rng.normal(-2.3, 1.3, n)))
    y = (rng.random(n) < p).astype(np.int8)
    return y, p, groups


def _intersection(groups: pd.DataFrame) -> np.ndarray:
    return (groups["sex"] + " & " + groups["race_ethnicity"] + " & " + groups["age_band"]).to_numpy()


def _ours(y, p, groups, *, n_boot: int, auroc_ci: str = "delong") -> tuple[float, float, int]:
    combo = _intersection(groups)
    w0, c0 = time.perf_counter(), time.process_time()
    a = subgroup_table(
        y, p, 0.15, {"sex & race & age": combo}, intersections=False, n_boot=n_boot, auroc_ci=auroc_ci
    )
    return time.perf_counter() - w0, time.process_time() - c0, len(a.rows) - 1


def _fairlearn(y, p, groups, *, n_boot: int) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    reference_metric_frame(y, p, 0.15, groups, n_boot=n_boot, seed=0)
    return time.perf_counter() - w0, time.process_time() - c0


def run(workdir: Path, *, scale: str, repetitions: int) -> list[dict]:
    cfg = SCALES[scale]
    out: list[dict] = []

    # 1. same data, same replicates
    y, p, g = _predictions(cfg["n_same"])
    ours, ours_cpu, fl, fl_cpu = [], [], [], []
    for _ in range(repetitions):
        w, c, n_groups = _ours(y, p, g, n_boot=cfg["boot_same"])
        ours.append(w)
        ours_cpu.append(c)
        w, c = _fairlearn(y, p, g, n_boot=cfg["boot_same"])
        fl.append(w)
        fl_cpu.append(c)
    out.append(
        {
            "name": f"fairness: subgroup table, {cfg['n_same']:,} predictions, {n_groups} groups, "
            f"{cfg['boot_same']} bootstrap replicates (same data, same replicates)",
            "ours": "subgroup_table (multinomial bootstrap of confusion counts, DeLong AUROC)",
            "ours_s": ours,
            "ours_cpu_s": ours_cpu,
            "baseline": f"fairlearn MetricFrame(n_boot={cfg['boot_same']}), 4 metrics",
            "baseline_s": fl,
            "baseline_cpu_s": fl_cpu,
            "goal": "faster than fairlearn (ours does more metrics; its cost is mostly fixed, not per replicate)",
            "goal_ratio": 1.0,
            "higher_is_better": True,
        }
    )

    # 2. the scale: 1000 replicates; fairlearn measured with few replicates and extrapolated
    y, p, g = _predictions(cfg["n"])
    ours, ours_cpu, fl, fl_cpu, fl_measured = [], [], [], [], []
    factor = 1000 / cfg["boot_fl"]
    for _ in range(repetitions):
        w, c, n_groups = _ours(y, p, g, n_boot=1000)
        ours.append(w)
        ours_cpu.append(c)
        # fairlearn's cost = one MetricFrame for the point estimates + one per replicate
        w_point, c_point = _fairlearn(y, p, g, n_boot=0)
        w, c = _fairlearn(y, p, g, n_boot=cfg["boot_fl"])
        fl_measured.append(w)
        fl.append(w_point + max(w - w_point, 0.0) * factor)
        fl_cpu.append(c_point + max(c - c_point, 0.0) * factor)
    out.append(
        {
            "name": f"fairness: subgroup table, {cfg['n']:,} predictions, {n_groups} intersectional groups, "
            "1000 bootstrap replicates",
            "ours": "subgroup_table(n_boot=1000)",
            "ours_s": ours,
            "ours_cpu_s": ours_cpu,
            "baseline": "fairlearn MetricFrame(n_boot=1000), EXTRAPOLATED: point-estimate time + "
            f"{factor:g} x the per-replicate time measured with n_boot={cfg['boot_fl']} on the same rows",
            "baseline_s": fl,
            "baseline_cpu_s": fl_cpu,
            "goal": ">= 1000x fairlearn's bootstrap",
            "goal_ratio": 1000.0,
            "higher_is_better": True,
            "extra": {
                "fairlearn_measured_s": fl_measured,
                "fairlearn_measured_n_boot": cfg["boot_fl"],
                "extrapolation_factor": factor,
                "rows": cfg["n"],
                "groups": n_groups,
            },
        }
    )

    # 3. AUROC intervals: DeLong vs a stratified row bootstrap, measured separately
    y, p, g = _predictions(cfg["n_auc"])
    delong, boot = [], []
    for _ in range(repetitions):
        delong.append(_ours(y, p, g, n_boot=cfg["boot_auc"])[0])
        boot.append(_ours(y, p, g, n_boot=cfg["boot_auc"], auroc_ci="bootstrap")[0])
    out.append(
        {
            "name": f"fairness: AUROC CIs, {cfg['n_auc']:,} predictions, 40 groups, {cfg['boot_auc']} replicates",
            "ours": "DeLong variance (auroc_ci='delong')",
            "ours_s": delong,
            "baseline": "stratified row bootstrap of each group (auroc_ci='bootstrap')",
            "baseline_s": boot,
            "goal": "informational: the row bootstrap is the option for small validation cohorts",
            "goal_ratio": None,
        }
    )
    return out


if __name__ == "__main__":
    import json
    import sys
    import tempfile

    scale = sys.argv[1] if len(sys.argv) > 1 else "small"
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(run(Path(d), scale=scale, repetitions=1), indent=2))
