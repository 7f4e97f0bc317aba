"""The approved champion of each use case as the service scores with it, reloaded when the pointer moves.

A model is served only when the registry's champion pointer names it and the decision log holds a decision
that promoted it (the promotion gate's, or a recorded manual approval): a pointer written by hand without a
decision, or a model file that no longer matches its checksum, is never served. The pointer file is checked
on every request (one ``stat``); the model is loaded again only when it changed, so a promotion is served by
the next request without a restart.
"""

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl

from clinical_ml.core.features import (
    CATEGORICAL_STATIC,
    COHORT_KEYS,
    category_slug,
    feature_columns,
    history_columns,
    history_features,
    stays_aggregates,
)
from clinical_ml.core.registry import CHAMPION_FILE, ModelCard, Registry, RegistryIntegrityError
from clinical_ml.core.scoring import Guardrails, Score, Scorer
from clinical_ml.core.usecase import UseCase
from clinical_ml.serve.chart import Chart

# CDS Hooks hook per prediction-time anchor: at discharge, when the discharge is being done; otherwise when
# a clinician opens the chart during the stay.
HOOK_BY_ANCHOR = {"discharge": "encounter-discharge"}
DEFAULT_HOOK = "patient-view"


def hook_for(use_case: UseCase) -> str:
    return HOOK_BY_ANCHOR.get(use_case.prediction_time.anchor, DEFAULT_HOOK)


@dataclass(frozen=True)
class ServedModel:
    """An approved model with what scoring one chart needs.

    A chart's features are the batch path's: its windowed aggregates come from
    :func:`clinical_ml.core.features.stays_aggregates` (the batch path's rule and polars expressions, for
    the stays of the hook calls scored together), then the row is laid out as
    :func:`clinical_ml.core.features.build_features` lays out many (missing counts 0, missing indicators 1,
    numeric static attributes, the model's one-hot columns), in plain Python: for one stay the batch path's
    joins cost ten times the aggregates. Tests hold the two equal.
    """

    use_case: UseCase
    card: ModelCard
    scorer: Scorer

    @property
    def version(self) -> str:
        return self.card.version

    @cached_property
    def _one_hot(self) -> dict[str, list[str]]:
        """Per categorical attribute, the category slugs the model has columns for (``unit__micu``)."""
        out: dict[str, list[str]] = {}
        for attr in CATEGORICAL_STATIC:
            slugs = [
                n.removeprefix(f"{attr}__") for n in self.card.feature_names if n.startswith(f"{attr}__")
            ]
            if slugs:
                out[attr] = slugs
        return out

    @cached_property
    def _columns(self) -> tuple[list[str], list[str], list[str]]:
        """The windowed columns, the numeric static attributes and the history columns of the use case."""
        uc = self.use_case
        history = history_columns(uc)
        static: list[str] = [s for s in uc.features.static if s not in CATEGORICAL_STATIC]
        windowed = [c for c in feature_columns(uc) if c not in history and c not in static]
        return windowed, static, history

    def categories(self, cohort: pl.DataFrame) -> dict[str, list[str]]:
        """The one-hot categories as the model's columns name them (``unit__micu``), each given by a value
        whose slug is the column's: the stay's own value where its slug matches, so its column is 1 and the
        others 0, as in the batch path (the ``categories`` argument of ``build_features``)."""
        out: dict[str, list[str]] = {}
        row = cohort.row(0, named=True)
        for attr, slugs in self._one_hot.items():
            own = row.get(attr)
            own_slug = category_slug(own) if own is not None else None
            out[attr] = [own if (own is not None and s == own_slug) else s for s in slugs]
        return out

    def feature_values(self, chart: Chart) -> dict[str, float | None]:
        """The chart's feature row by name (None: not measured), by the batch path's feature code."""
        return self.feature_rows([chart])[0]

    def feature_rows(self, charts: Sequence[Chart]) -> list[dict[str, float | None]]:
        """:meth:`feature_values` of several charts, their windowed aggregates from one polars aggregation."""
        uc = self.use_case
        aggregates = stays_aggregates([(c.measurements, c.prediction_time) for c in charts], uc)
        return [self._row(c, found) for c, found in zip(charts, aggregates, strict=True)]

    def _row(self, chart: Chart, found: dict[str, float | None]) -> dict[str, float | None]:
        uc = self.use_case
        windowed, static, history = self._columns
        row = chart.stay
        out: dict[str, float | None] = {}
        for c in windowed:
            v = found.get(c)
            if v is None and "__count_" in c:
                v = 0.0
            elif v is None and "__missing_" in c:
                v = 1.0
            out[c] = v
        for s in static:
            out[s] = None if row.get(s) is None else float(row[s])
        for attr, slugs in self._one_hot.items():
            own = row.get(attr)
            own_slug = category_slug(own) if own is not None else None
            for s in slugs:
                out[f"{attr}__{s}"] = 1.0 if s == own_slug else 0.0
        if history:
            past = history_features(chart.cohort, chart.encounters, chart.events, uc).row(0, named=True)
            out |= {c: past[c] for c in history}
        return out

    def features(self, chart: Chart) -> pl.DataFrame:
        """The chart's feature row as a frame (the cohort keys, then :meth:`feature_values`)."""
        keys = chart.cohort.select(COHORT_KEYS)
        values = self.feature_values(chart)
        return keys.hstack(
            pl.DataFrame({c: [v] for c, v in values.items()}, schema=dict.fromkeys(values, pl.Float64))
        )

    def score(self, chart: Chart, *, n_reasons: int = 3) -> tuple[Score, dict[str, float | None]]:
        return self.score_many([chart], n_reasons=n_reasons)[0]

    def score_many(
        self, charts: Sequence[Chart], *, n_reasons: int = 3
    ) -> list[tuple[Score, dict[str, float | None]]]:
        """Each chart's score and feature row: one aggregation, one LightGBM pass and one reasons call for
        all (each row is scored alone by the trees; the scores are the same as one chart at a time)."""
        if not charts:
            return []
        rows = self.feature_rows(charts)
        names = self.scorer.model.feature_names
        x = np.array(
            [[np.nan if (v := values.get(n)) is None else v for n in names] for values in rows],
            dtype=np.float64,
        ).reshape(len(rows), len(names))
        return list(zip(self.scorer.score(x, n_reasons=n_reasons), rows, strict=True))


def served_model(registry: Registry, use_case: UseCase, version: str) -> ServedModel:
    card = registry.card(version)
    scorer = Scorer(
        model=registry.model(version),
        threshold=card.threshold,
        training_ranges=card.training_ranges,
        guardrails=Guardrails(**card.guardrails) if card.guardrails else None,
    )
    return ServedModel(use_case, card, scorer)


class NotServable(RuntimeError):
    """The use case has no model the service may use (the message says why, without values)."""


@dataclass(frozen=True)
class _Seen:
    stamp: tuple[int, int, int]
    model: ServedModel | None
    problem: str | None


class ChampionWatch:
    """The served model of one use case: its approved champion, loaded again when the pointer changes."""

    def __init__(self, registry_root: Path, use_case: UseCase) -> None:
        self.registry = Registry(registry_root, use_case.name)
        self.use_case = use_case
        self._pointer = Path(registry_root) / use_case.name / CHAMPION_FILE
        self._seen: _Seen | None = None
        self._lock = threading.Lock()

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self._pointer.stat()
        except FileNotFoundError:
            return None
        # the pointer is replaced atomically: a new inode even when the clock's resolution hides the change
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _load(self) -> tuple[ServedModel | None, str | None]:
        version = self.registry.champion()
        if version is None:
            return None, "no champion model yet"
        promoted = any(d.promoted and d.challenger == version for d in self.registry.decisions())
        if not promoted:
            return None, "the champion pointer names a model no recorded decision approved"
        try:
            return served_model(self.registry, self.use_case, version), None
        except (RegistryIntegrityError, FileNotFoundError, ValueError) as exc:
            return None, f"the champion model cannot be loaded ({type(exc).__name__})"

    def current(self) -> ServedModel:
        """The model to score with now.

        Raises
        ------
        NotServable
            No champion, an unapproved pointer, or a damaged model file.
        """
        stamp = self._stamp()
        if stamp is None:
            raise NotServable("no champion model yet")
        seen = self._seen
        if seen is None or seen.stamp != stamp:
            with self._lock:
                seen = self._seen
                if seen is None or seen.stamp != stamp:
                    model, problem = self._load()
                    seen = self._seen = _Seen(stamp, model, problem)
        if seen.model is None:
            raise NotServable(seen.problem or "no champion model")
        return seen.model

    def servable(self) -> bool:
        try:
            self.current()
        except NotServable:
            return False
        return True
