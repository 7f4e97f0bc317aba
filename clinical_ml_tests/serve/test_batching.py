"""Hook calls scored together answer as each call scored alone (features, scores, reasons, cards, records),
one call's trouble stays its own, and a batch scores with one champion."""

import asyncio
import dataclasses
import itertools
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from clinical_ml.core.features import (
    HOURS_PER_US,
    ROW_KEY,
    stay_aggregates,
    stays_aggregates,
    stem_aggregates,
)
from clinical_ml.core.registry import Registry
from clinical_ml.serve.app import create_app
from clinical_ml.serve.batching import MicroBatcher
from clinical_ml.serve.models import ServedModel, served_model
from clinical_ml.serve.service import CdsService, PendingCall, Reply
from clinical_ml.serve.settings import ServiceSettings
from clinical_ml_tests.serve.conftest import BASE_URL, NOW, USE_CASE, Ehr, stay_request, use_case
from clinical_ml_tests.serve.test_parity import (
    FAST,
    PREDICTED,
    SUMS,
    _all_aggregates_use_case,
    _chart,
    _event,
    _same,
)

HOOK = f"{BASE_URL}/cds-services/{USE_CASE}"
AT = NOW.replace(tzinfo=UTC)


@pytest.fixture(scope="module")
def served(trained_registry: Path) -> ServedModel:
    registry = Registry(trained_registry, USE_CASE)
    version = registry.champion()
    assert version is not None
    return served_model(registry, use_case(), version)


def _agree(key: str, a: float | None, b: float | None) -> bool:
    # means and slopes are sums of floats: polars' grouped sums differ in the last bits with the other groups
    # of the frame (the batch path's own results included); everything else is the same bit for bit
    return _same(a, b, rel=1e-12 if any(s in key for s in SUMS) else 0.0)


# -- the aggregates -------------------------------------------------------------------------------------
_stays = st.lists(
    st.tuples(st.lists(_event, max_size=25), st.integers(min_value=-3000, max_value=3000)),
    min_size=1,
    max_size=8,
)


@FAST
@given(stays=_stays)
def test_stays_aggregated_together_are_each_alone_and_the_batch_paths(stays) -> None:
    uc = _all_aggregates_use_case()
    charts = [_chart(events) for events, _ in stays]
    times = [PREDICTED + timedelta(minutes=shift) for _, shift in stays]
    # each stay's events moved with its prediction time: the stays differ in their clocks too
    shifted = [
        [
            (code, tm + (t - PREDICTED), av + (t - PREDICTED), v, imp)
            for code, tm, av, v, imp in c.measurements
        ]
        for c, t in zip(charts, times, strict=True)
    ]
    together = stays_aggregates(list(zip(shifted, times, strict=True)), uc)
    # the batch path over the same stays as one cohort (ids 0, 1, ...; events shifted to each time)
    events = pl.concat(
        [
            c.events.with_columns(
                pl.lit(i, dtype=pl.Int64).alias("hadm_id"),
                pl.col("time") + (t - PREDICTED),
                pl.col("available_time") + (t - PREDICTED),
            )
            for i, (c, t) in enumerate(zip(charts, times, strict=True))
        ]
    )
    cohort = pl.concat(
        [
            c.cohort.with_columns(
                pl.lit(i, dtype=pl.Int64).alias("hadm_id"), pl.lit(t).alias("prediction_time")
            )
            for i, (c, t) in enumerate(zip(charts, times, strict=True))
        ]
    )
    long = stem_aggregates(events, cohort, uc)
    names = [c for c in long.columns if c not in (*ROW_KEY, "stem")]
    batch: list[dict] = [{} for _ in charts]
    for r in long.iter_rows(named=True):
        batch[r["hadm_id"]] |= {f"{r['stem']}__{n}": r[n] for n in names}
    for i, t in enumerate(times):
        alone = stay_aggregates(shifted[i], t, uc)
        assert alone == stays_aggregates([(shifted[i], t)], uc)[0]
        mine = together[i]
        assert mine.keys() == alone.keys() == batch[i].keys()
        assert all(_agree(k, mine[k], alone[k]) and _agree(k, mine[k], batch[i][k]) for k in mine)


def test_hours_since_a_value_do_not_depend_on_the_stays_aggregated_with_it() -> None:
    # 81,360 s: polars divided a column of one or two by 3.6e9 exactly (22.6) and a longer one through the
    # reciprocal (22.599999999999998); a stay alone and the same stay in a batch now agree, as the batch path
    uc = _all_aggregates_use_case()
    t = PREDICTED - timedelta(hours=22.6)
    one = [("LAB//2524-7", t, t, 2.0, False)]
    others = [
        ("VITAL//heart_rate", PREDICTED - timedelta(hours=h), PREDICTED, 80.0, False) for h in (1, 2, 3)
    ]
    alone = stay_aggregates(one, PREDICTED, uc)
    together = stays_aggregates([(one, PREDICTED), (others, PREDICTED)], uc)[0]
    assert alone == together
    assert (
        alone["lactate__time_since_last_24h"] == 81_360_000_000 * HOURS_PER_US
    )  # as the batch path: 22.599...8


# -- the scores -------------------------------------------------------------------------------------------
@FAST
@given(
    stays=st.lists(
        st.tuples(
            st.lists(_event, max_size=25),
            st.sampled_from(["MICU", "SICU", "unmapped", None]),
            st.sampled_from([17, 70, 90, None]),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_charts_scored_together_score_as_each_alone(served: ServedModel, stays) -> None:
    charts = [_chart(events, unit=unit, age=age) for events, unit, age in stays]
    together = served.score_many(charts)
    assert len(together) == len(charts)
    for chart, (score, values) in zip(charts, together, strict=True):
        alone_score, alone_values = served.score(chart)
        assert values.keys() == alone_values.keys()
        assert all(_agree(k, values[k], alone_values[k]) for k in values)
        # the trees compare features with thresholds halfway between training values: a last-bit difference of
        # a mean or slope does not move a prediction; the scores and reasons are the same
        assert (score.abstained, score.flagged, score.flags, score.reason_code) == (
            alone_score.abstained,
            alone_score.flagged,
            alone_score.flags,
            alone_score.reason_code,
        )
        assert (math.isnan(score.risk) and math.isnan(alone_score.risk)) or score.risk == alone_score.risk
        assert score.reasons == alone_score.reasons
    assert served.score_many([]) == []


# -- the service: cards and records -----------------------------------------------------------------------
@pytest.fixture
def app(data_root: Path, usecases_dir: Path, trust_file: Path):
    settings = ServiceSettings(
        data_root=data_root, usecases_dir=usecases_dir, base_url=BASE_URL, trust_file=trust_file
    )
    return create_app(settings, clock=lambda: AT)


def _requests() -> list[dict]:
    """Stays the service answers differently: scored at several risks, too young, too early in the stay."""
    return [
        stay_request(lactate=1.0),
        stay_request(lactate=9.5, n_vitals=3),
        stay_request(birth=datetime(2015, 1, 1).date()),  # a child: outside the population
        stay_request(admit=NOW - timedelta(hours=2)),  # before the prediction time
        stay_request(lactate=4.5, unit="SICU"),
    ]


def _comparable(reply: Reply) -> tuple:
    cards = [{k: v for k, v in c.items() if k != "uuid"} for c in reply.body["cards"]]
    return reply.status, reply.outcome, reply.model_version, reply.headers, cards


def _prepared(service: CdsService, bodies: list[dict]) -> list[PendingCall]:
    out = []
    for body in bodies:
        p = service.prepare(USE_CASE, body, now=AT)
        assert isinstance(p, PendingCall)
        out.append(p)
    return out


def test_a_batch_answers_as_each_call_alone(app) -> None:
    service: CdsService = app.state.service
    bodies = _requests()
    alone = [service.call(USE_CASE, b, now=AT) for b in bodies]
    together = service.answer(_prepared(service, bodies))
    assert [_comparable(r) for r in together] == [_comparable(r) for r in alone]
    outcomes = {r.outcome for r in together}
    assert {"scored", "not_eligible"} <= outcomes
    assert len({c["summary"] for r in together for c in r.body["cards"]}) >= 3  # different answers
    # the records: one line per card, in order, as alone (card uuids and times apart)
    records = service.records.read(USE_CASE, "predictions")
    assert len(records) == 2 * len(bodies)
    strip = ("card_uuid", "served_at")
    first, second = records[: len(bodies)], records[len(bodies) :]
    assert [{k: v for k, v in r.items() if k not in strip} for r in first] == [
        {k: v for k, v in r.items() if k not in strip} for r in second
    ]
    assert [r["card_uuid"] for r in second] == [r.body["cards"][0]["uuid"] for r in together]


def test_one_calls_error_fails_only_that_call(app, monkeypatch: pytest.MonkeyPatch) -> None:
    service: CdsService = app.state.service
    bodies = _requests()
    alone = [service.call(USE_CASE, b, now=AT) for b in bodies]
    served = service.watches[USE_CASE].current()
    real = ServedModel.score_many

    def broken(self, charts, **kw):
        # the chart of the second request (lactate 9.5) cannot be scored
        if any(v == 9.5 for c in charts for *_, v, _imp in c.measurements):
            raise ValueError("pat-4711 has value 9.5")
        return real(self, charts, **kw)

    monkeypatch.setattr(type(served), "score_many", broken)
    together = service.answer(_prepared(service, bodies))
    assert together[1].status == 500 and together[1].outcome == "error:ValueError"
    assert "pat-4711" not in str(together[1].body)
    others = [0, 2, 3, 4]
    assert [_comparable(together[i]) for i in others] == [_comparable(alone[i]) for i in others]


def test_a_batch_scores_with_one_champion(app, monkeypatch: pytest.MonkeyPatch) -> None:
    service: CdsService = app.state.service
    watch = service.watches[USE_CASE]
    first = watch.current()
    promoted = dataclasses.replace(first, card=dataclasses.replace(first.card, version="promoted-mid-batch"))
    calls = _prepared(service, _requests())
    snapshots = itertools.chain([first], itertools.repeat(promoted))  # promoted after the batch's read
    monkeypatch.setattr(watch, "current", lambda: next(snapshots))
    together = service.answer(calls)
    assert {r.model_version for r in together} == {first.version}
    assert {v for r in together for c in r.body["cards"] for v in c.get("extension", {}).values()} == {
        first.version
    }
    assert {r.headers["X-Model-Version"] for r in together if r.headers} == {first.version}
    # the next batch scores with the promoted model, whole
    again = service.answer(_prepared(service, _requests()))
    assert {r.model_version for r in again} == {"promoted-mid-batch"}


# -- over HTTP: concurrent calls are batched ----------------------------------------------------------------
def test_concurrent_calls_are_answered_together_as_each_alone(app, ehr: Ehr) -> None:
    bodies = _requests() * 3
    sequential = TestClient(app, base_url=BASE_URL)
    alone = [
        sequential.post(
            f"/cds-services/{USE_CASE}", json=b, headers={"Authorization": f"Bearer {ehr.token(HOOK)}"}
        )
        for b in bodies
    ]
    batcher: MicroBatcher = app.state.batcher
    assert batcher.largest == 1  # one at a time: batches of one

    async def concurrently() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            return await asyncio.gather(
                *[
                    client.post(
                        f"/cds-services/{USE_CASE}",
                        json=b,
                        headers={"Authorization": f"Bearer {ehr.token(HOOK)}"},
                    )
                    for b in bodies
                ]
            )

    together = asyncio.run(concurrently())
    assert batcher.largest > 1

    def comparable(r: Any) -> tuple:
        body = r.json()
        return (
            r.status_code,
            r.headers.get("x-model-version"),
            [{k: v for k, v in c.items() if k != "uuid"} for c in body["cards"]],
        )

    assert [comparable(r) for r in together] == [comparable(r) for r in alone]
    assert all(r.status_code == 200 for r in together)


def test_the_batcher_answers_every_item_and_its_failure_each_item() -> None:
    sizes: list[int] = []

    def work(items):
        sizes.append(len(items))
        if "bad" in items:
            raise ValueError("the batch")
        return [f"{i}!" for i in items]

    batcher = MicroBatcher(work, failed=lambda exc: f"failed:{type(exc).__name__}", max_batch=3)

    async def run(items):
        return await asyncio.gather(*[batcher.submit(i) for i in items])

    assert asyncio.run(run(["a", "b", "c", "d", "e"])) == ["a!", "b!", "c!", "d!", "e!"]
    assert sizes == [3, 2]  # capped at max_batch, nothing left behind
    assert asyncio.run(run(["x"])) == ["x!"]  # alone: answered without waiting for company
    assert asyncio.run(run(["bad", "y"])) == ["failed:ValueError", "failed:ValueError"]
    assert (batcher.calls, batcher.batches, batcher.largest) == (8, 4, 3)
    with pytest.raises(ValueError):
        MicroBatcher(work, failed=str, max_batch=0)
