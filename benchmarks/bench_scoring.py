"""One-patient scoring with reasons and guardrails (`Scorer.score`), in process: p99 latency vs the 10 ms SLO.

The bare `Booster.predict` of one row (LightGBM's defaults, no reasons, no guardrails) is reported beside it.
"""

import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_training import SCALES, write_inputs
from clinical_ml.core.modeling import train_model
from clinical_ml.core.scoring import Guardrails, Scorer, scoring_latency_ms
from clinical_ml.core.training import training_ranges

SLO_S = 0.010
CALLS = {"small": 1000, "default": 5000}


def run(workdir: Path, *, scale: str, repetitions: int) -> list[dict]:
    x_tr, y_tr, x_tu, y_tu, cols = write_inputs(Path(workdir), min(SCALES[scale], 50_000))
    names = list(cols)
    model = train_model(x_tr, y_tr.astype(int), x_tu, y_tu.astype(int), feature_names=names, seed=0)
    scorer = Scorer(model, 0.2, training_ranges(x_tr, names), Guardrails())
    rows = x_tu[:500]
    ours, cpu, bare, p50 = [], [], [], []
    for _ in range(repetitions):
        lat = scoring_latency_ms(scorer, rows, repeats=CALLS[scale], rounds=1)
        ours.append(lat["p99_ms"] / 1000)
        cpu.append(lat["p99_cpu_ms"] / 1000)
        p50.append(lat["p50_ms"])
        t = np.empty(CALLS[scale])
        for i in range(len(t)):
            t0 = time.perf_counter()
            model.booster.predict(rows[i % len(rows)][None, :], num_iteration=model.best_iteration)
            t[i] = time.perf_counter() - t0
        bare.append(float(np.percentile(t, 99)))
    return [
        {
            "name": f"scoring: one patient, risk + 3 reasons + guardrails, p99 of {CALLS[scale]} calls",
            "ours": "Scorer.score (p99 wall)",
            "ours_s": ours,
            "baseline": "the 10 ms SLO",
            "baseline_s": [SLO_S] * len(ours),
            "goal": "p99 <= 10 ms",
            "goal_ratio": 1.0,
            "extra": {
                "p99_cpu_ms": [c * 1000 for c in cpu],
                "p50_ms": p50,
                "bare_booster_predict_p99_ms": [b * 1000 for b in bare],
                "trees": model.best_iteration,
                "features": len(names),
            },
        }
    ]


if __name__ == "__main__":
    import json
    import sys

    with tempfile.TemporaryDirectory() as d:
        print(
            json.dumps(
                run(Path(d), scale=sys.argv[1] if len(sys.argv) > 1 else "small", repetitions=2), indent=1
            )
        )
