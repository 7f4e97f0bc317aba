"""The graph's computation with no orchestrator: the baseline of `bench_graph`.

Every asset and check of a job is a plain Python function (the body under its decorator). This script calls
those functions directly, in the job's dependency order, with the resources built as plain objects and a
minimal stand-in for the context (partition key, logger, run id): no Dagster instance, no run or event
storage, no executor, no step processes, no metadata recorded. What it computes and writes is by construction
what the graph computes and writes, so the ratio graph/bare is what orchestration costs, and the baseline
cannot fall out of step as the stages change (a hand-written copy of the stage code did within an hour while
six people were changing them).
"""

import inspect
import logging
import typing
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import dagster as dg

LOG = logging.getLogger("bare_pipeline")


@dataclass(frozen=True)
class _Run:
    run_id: str
    tags: Mapping[str, str] = field(default_factory=dict)


_EMPTY_INSTANCE: list[dg.DagsterInstance] = []


def _empty_instance() -> dg.DagsterInstance:
    if not _EMPTY_INSTANCE:
        _EMPTY_INSTANCE.append(dg.DagsterInstance.ephemeral())
    return _EMPTY_INSTANCE[0]


class BareContext:
    """What the asset bodies read from their context; anything else fails loudly, so a body that starts to
    need more shows up here rather than silently doing something else.

    ``partition_keys`` is the run's batches: one for a run of one partition, several for a ranged run (a
    backfill under a ``BackfillPolicy``); per-partition metadata is accepted and dropped, as all metadata is.
    """

    def __init__(self, partition_keys: Sequence[str] | None) -> None:
        self._partition_keys = list(partition_keys) if partition_keys else None
        self.log = LOG
        self.run = _Run(run_id=uuid.uuid4().hex)
        self.dagster_run = self.run

    @property
    def partition_key(self) -> str:
        if self._partition_keys is None:
            raise AttributeError("this asset is not partitioned")
        if len(self._partition_keys) != 1:
            raise AttributeError("a ranged run has no single partition key: use partition_keys")
        return self._partition_keys[0]

    @property
    def partition_keys(self) -> list[str]:
        if self._partition_keys is None:
            raise AttributeError("this asset is not partitioned")
        return self._partition_keys

    @property
    def has_partition_key(self) -> bool:
        return self._partition_keys is not None and len(self._partition_keys) == 1

    def add_asset_metadata(self, metadata: Mapping[str, object], **_: object) -> None:
        pass

    @property
    def instance(self) -> dg.DagsterInstance:
        """An empty ephemeral instance: with no orchestrator nothing ran as a run, so the run history a body
        reads (the system-health page's failed and stuck runs) is empty."""
        return _empty_instance()

    def __getattr__(self, name: str):
        raise AttributeError(f"bare_pipeline's context has no {name!r}; add it to BareContext")


def _call(
    node: dg.OpDefinition, resources: Mapping[str, object], partition_keys: Sequence[str] | None
) -> None:
    compute = node.compute_fn
    fn: Callable[..., object] = getattr(compute, "decorated_fn", None) or compute  # type: ignore[assignment]
    params = list(inspect.signature(fn).parameters.values())
    args: list[object] = []
    kwargs: dict[str, object] = {}
    if params and getattr(compute, "has_context_arg", lambda: params[0].name == "context")():
        args.append(BareContext(partition_keys))
        params = params[1:]
    hints = typing.get_type_hints(fn)
    for p in params:
        hint = hints.get(p.name)
        if p.name in resources:
            kwargs[p.name] = resources[p.name]
        elif isinstance(hint, type) and issubclass(hint, dg.Config):
            kwargs[p.name] = hint()  # its defaults: the graph's runs give no run config either
        else:
            raise NotImplementedError(
                f"{node.name}: argument {p.name!r} is neither a resource, a config nor the context"
            )
    out = fn(*args, **kwargs)
    if inspect.isgenerator(out):
        for _ in out:
            pass


def run_job(
    job: dg.JobDefinition,
    resources: Mapping[str, object],
    *,
    partition_key: str | None = None,
    partition_keys: Sequence[str] | None = None,
) -> int:
    """Call every op of ``job`` in dependency order, for one partition or a range of them (as one ranged
    run does); returns how many were called."""
    if partition_key is not None:
        partition_keys = [partition_key]
    nodes = job.graph.nodes_in_topological_order
    for node in nodes:
        definition = node.definition
        if not isinstance(definition, dg.OpDefinition):
            raise NotImplementedError(f"{node.name} is a graph-backed asset")
        _call(definition, resources, partition_keys)
    return len(nodes)
