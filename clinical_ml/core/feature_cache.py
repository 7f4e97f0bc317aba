"""Features rebuilt only where their inputs changed: one cached part per delivery batch of the cohort.

A feature row depends on its admission's cohort row and on that admission's events, wherever they were
delivered (a late result can arrive in a later batch). So the part of batch B is keyed by

* the feature code (the source of :mod:`clinical_ml.core.features` and :mod:`clinical_ml.core.units`, the
  polars version) and the use case's feature specification,
* the cohort rows of B (their content, hashed),
* the fingerprint (name, size, modification time) of every event file that holds an event of one of B's
  admissions, found through a small per-file index of admission ids (itself cached by fingerprint).

A part whose key is unchanged is reused; the others are computed together, in groups of batches so that
memory stays bounded, with :func:`clinical_ml.core.features.build_features` (a feature row only depends on
its own admission, so a part computed alone equals the same rows of a full build; tested). After a new daily
batch only its part (and the part of any batch whose admissions got late events) is computed.
"""

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from clinical_ml.core import features as features_module
from clinical_ml.core import units as units_module
from clinical_ml.core.features import ROW_KEY, build_features, learn_categories
from clinical_ml.core.storage import read_json, write_json, write_parquet
from clinical_ml.core.usecase import UseCase

MANIFEST = "manifest.json"
_NO_EVENTS = pl.DataFrame(
    schema={
        "hadm_id": pl.Int64,
        "code": pl.String,
        "numeric_value": pl.Float32,
        "implausible": pl.Boolean,
        "time": pl.Datetime("us"),
        "available_time": pl.Datetime("us"),
    }
)


@dataclass(frozen=True)
class IncrementalStats:
    batches: int
    reused: int
    computed: int
    event_files: int
    event_files_indexed: int


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


def feature_code_version(use_case: UseCase, categories: dict[str, list[str]] | None = None) -> str:
    """Changes when the feature code, polars, the use case's feature specification or the one-hot
    categories change."""
    h = hashlib.sha256()
    for module in (features_module, units_module):
        h.update(Path(str(module.__file__)).read_bytes())
    h.update(pl.__version__.encode())
    h.update(json.dumps(use_case.features.model_dump(mode="json"), sort_keys=True).encode())
    h.update(json.dumps(use_case.prediction_time.model_dump(mode="json"), sort_keys=True).encode())
    h.update(json.dumps(categories or {}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _admission_index(
    event_files: Sequence[Path], cache_dir: Path, manifest: dict
) -> tuple[pl.DataFrame, int]:
    """(hadm_id, file) for every admission with an event in a file; each file's ids read once per version."""
    known = manifest.get("index", {})
    fresh, parts, indexed = {}, [], 0
    for f in event_files:
        fp = _fingerprint(f)
        ids = cache_dir / "index" / f"{f.stem}.parquet"
        if known.get(f.name) != fp or not ids.exists():
            write_parquet(pl.scan_parquet(f).select("hadm_id").unique().sort("hadm_id").collect(), ids)
            indexed += 1
        fresh[f.name] = fp
        parts.append(pl.scan_parquet(ids).with_columns(pl.lit(f.name).alias("file")))
    for stale in set(known) - set(fresh):
        (cache_dir / "index" / f"{Path(stale).stem}.parquet").unlink(missing_ok=True)
    manifest["index"] = fresh
    if not parts:
        return pl.DataFrame(schema={"hadm_id": pl.Int64, "file": pl.String}), indexed
    return pl.concat(parts).collect(), indexed


def _part_name(batch_id: str) -> str:
    return hashlib.sha256(batch_id.encode()).hexdigest()[:16] + ".parquet"


def build_features_incremental(
    event_files: Sequence[Path],
    cohort: pl.DataFrame,
    use_case: UseCase,
    cache_dir: Path,
    *,
    batches_per_group: int = 30,
) -> tuple[pl.DataFrame, IncrementalStats]:
    """The same frame as ``build_features(all events, cohort, use_case)`` (rows in cohort order), computing
    only the batches whose key changed since the last call with this ``cache_dir``.

    ``cohort`` must carry ``batch_id``. ``event_files`` are the de-identified MEDS event files of every batch.
    """
    cache_dir = Path(cache_dir)
    manifest_path = cache_dir / MANIFEST
    manifest = read_json(manifest_path) if manifest_path.exists() else {}
    files = sorted(Path(f) for f in event_files)
    index, indexed = _admission_index(files, cache_dir, manifest)
    fingerprints = manifest["index"]
    # categories of the whole cohort, so that every part has the same one-hot columns
    categories = learn_categories(cohort, use_case)
    version = feature_code_version(use_case, categories)

    cohort_batches = cohort.select("hadm_id", "batch_id")
    files_of_batch = {
        b: sorted(fs)
        for b, fs in cohort_batches.join(index, on="hadm_id", how="inner")
        .group_by("batch_id")
        .agg(pl.col("file").unique())
        .iter_rows()
    }
    hashed = cohort.select(pl.col("batch_id"), pl.Series("_h", cohort.hash_rows(seed=0))).sort(
        "batch_id", "_h"
    )
    cohort_hash = {
        str(b): hashlib.sha256(part["_h"].to_numpy().tobytes()).hexdigest()
        for (b,), part in hashed.partition_by("batch_id", as_dict=True).items()
    }
    keys = {}
    for b in cohort_hash:
        payload = {
            "version": version,
            "cohort": cohort_hash[b],
            "files": [fingerprints[f] for f in files_of_batch.get(b, [])],
        }
        keys[b] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    old_parts: dict = manifest.get("parts", {})
    parts_dir = cache_dir / "parts"
    todo = sorted(
        b for b, k in keys.items() if old_parts.get(b) != k or not (parts_dir / _part_name(b)).exists()
    )
    by_name = {f.name: f for f in files}
    for start in range(0, len(todo), batches_per_group):
        group = todo[start : start + batches_per_group]
        group_files = sorted({f for b in group for f in files_of_batch.get(b, [])})
        sub = cohort.filter(pl.col("batch_id").is_in(group))
        events = pl.scan_parquet([by_name[f] for f in group_files]) if group_files else _NO_EVENTS.lazy()
        feats = build_features(events, sub, use_case, categories).join(
            sub.select(*ROW_KEY, "batch_id"), on=ROW_KEY, how="left", maintain_order="left"
        )
        for (b,), part in feats.partition_by("batch_id", as_dict=True, include_key=False).items():
            write_parquet(part, parts_dir / _part_name(str(b)))
        for b in group:
            old_parts[b] = keys[b]
        manifest["parts"] = old_parts
        write_json(manifest, manifest_path)  # a run stopped half-way keeps the groups it finished
    for gone in set(old_parts) - set(keys):
        (parts_dir / _part_name(gone)).unlink(missing_ok=True)
        del old_parts[gone]
    manifest["parts"] = old_parts
    write_json(manifest, manifest_path)

    if not keys:
        out = build_features(_NO_EVENTS.lazy(), cohort, use_case, categories)
    else:
        stacked = pl.concat([pl.scan_parquet(parts_dir / _part_name(b)) for b in keys]).collect()
        out = cohort.select(ROW_KEY).join(stacked, on=ROW_KEY, how="left", maintain_order="left")
        out = out.select(stacked.columns)
    stats = IncrementalStats(
        batches=len(keys),
        reused=len(keys) - len(todo),
        computed=len(todo),
        event_files=len(files),
        event_files_indexed=indexed,
    )
    return out, stats
