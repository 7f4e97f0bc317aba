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
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import dagster as dg

LOG = logging.getLogger("bare_pipeline")


@dataclass(frozen=True)
class _Run:
    run_id: str
    tags: Mapping[str, str] = field(default_factory=dict)


class BareContext:
    """What the asset bodies read from their context; anything else fails loudly, so a body that starts to
    need more shows up here rather than silently doing something else."""

    def __init__(self, partition_key: str | None) -> None:
        self._partition_key = partition_key
        self.log = LOG
        self.run = _Run(run_id=uuid.uuid4().hex)
        self.dagster_run = self.run

    @property
    def partition_key(self) -> str:
        if self._partition_key is None:
            raise AttributeError("this asset is not partitioned")
        return self._partition_key

    @property
    def has_partition_key(self) -> bool:
        return self._partition_key is not None

    def __getattr__(self, name: str):
        raise AttributeError(f"bare_pipeline's context has no {name!r}; add it to BareContext")


def _call(node: dg.OpDefinition, resources: Mapping[str, object], partition_key: str | None) -> None:
    compute = node.compute_fn
    fn = getattr(compute, "decorated_fn", compute)
    params = list(inspect.signature(fn).parameters.values())
    args: list[object] = []
    kwargs: dict[str, object] = {}
    if params and getattr(compute, "has_context_arg", lambda: params[0].name == "context")():
        args.append(BareContext(partition_key))
        params = params[1:]
    for p in params:
        if p.name not in resources:
            raise NotImplementedError(
                f"{node.name}: argument {p.name!r} is neither a resource nor the context"
            )
        kwargs[p.name] = resources[p.name]
    out = fn(*args, **kwargs)
    if inspect.isgenerator(out):
        for _ in out:
            pass


def run_job(
    job: dg.JobDefinition, resources: Mapping[str, object], *, partition_key: str | None = None
) -> int:
    """Call every op of ``job`` in dependency order; returns how many were called."""
    nodes = job.graph.nodes_in_topological_order
    for node in nodes:
        definition = node.definition
        if not isinstance(definition, dg.OpDefinition):
            raise NotImplementedError(f"{node.name} is a graph-backed asset")
        _call(definition, resources, partition_key)
    return len(nodes)
