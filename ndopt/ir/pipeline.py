"""The Pipeline: named components, a typed data-flow graph, a Schedule, and provenance.

A Pipeline is immutable: passes return new pipelines with `replace`, which shares every component
it does not swap; `frontend` names the model frontend that built it, whose interface passes ask
(`ndopt.model.interface_for`). The data-flow graph is a `networkx.DiGraph` whose nodes are the input sources
(`prompt`, `image`), the components and the `video` sink; each edge carries the port pairs it
connects, and every port has a TensorSpec (the verifier checks both ends agree).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import networkx as nx
import torch

from ndopt.ir.component import Component
from ndopt.ir.schedule import Schedule
from ndopt.ir.spec import CallSignature, Port
from ndopt.model import DEFAULT_FRONTEND

SINK = "video"


@runtime_checkable
class Sampler(Protocol):
    """What a frontend provides to run and cost a pipeline (Pyramid-Flow: the pyramidal sampler)."""

    def call_plan(self, pipeline: Pipeline) -> list[CallSignature]:
        """Every distinct static call of every component per video, with its count."""

    def sample(self, pipeline: Pipeline, prompts: list[str], *, generator: torch.Generator,
               progress: Any = None) -> torch.Tensor:
        """Prompts -> normalized latents [B, C, T, h, w] following pipeline.schedule."""

    def decode(self, pipeline: Pipeline, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> video [B, 3, frames, H, W] in [-1, 1]."""

    def describe(self, component: Component) -> str:
        """A short structural description for the summary (e.g. `24 blocks`)."""


@dataclass(frozen=True)
class AppliedPass:
    """Provenance of one pass: its name, config, whether it changed anything, and its metrics."""

    name: str
    config: Mapping[str, Any]
    modified: bool
    metrics: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pipeline:
    name: str
    components: Mapping[str, Component]
    graph: nx.DiGraph
    schedule: Schedule
    sampler: Sampler
    sources: Mapping[str, tuple[Port, ...]]
    sink: tuple[Port, ...]
    inputs: tuple[str, ...] = ("prompt",)  # the active sources (text-to-video: prompt only)
    provenance: tuple[AppliedPass, ...] = ()
    facts: frozenset[str] = frozenset()
    analyses: Mapping[str, Any] = field(default_factory=dict)
    frontend: str = DEFAULT_FRONTEND  # the model frontend that built it (ndopt.model.interface_for)

    # ---- construction -------------------------------------------------------------------
    @staticmethod
    def build_graph(components: Iterable[Component], sources: Iterable[str],
                    edges: Iterable[tuple[str, str, tuple[tuple[str, str], ...]]]) -> nx.DiGraph:
        g = nx.DiGraph()
        for s in sources:
            g.add_node(s, kind="source")
        for c in components:
            g.add_node(c.name, kind="component", role=c.role)
        g.add_node(SINK, kind="sink")
        for src, dst, ports in edges:
            g.add_edge(src, dst, ports=tuple(ports))
        return g

    def replace(self, *, schedule: Schedule | None = None, graph: nx.DiGraph | None = None,
                remove: Iterable[str] = (), facts_add: Iterable[str] = (), facts_remove: Iterable[str] = (),
                analyses: Mapping[str, Any] | None = None, **components: Component) -> Pipeline:
        """A new pipeline with the named components swapped (or removed); the rest are shared."""
        comps = dict(self.components)
        for name, comp in components.items():
            if comp.name != name:
                raise ValueError(f"component passed as {name!r} is named {comp.name!r}")
            comps[name] = comp
        g = (graph if graph is not None else self.graph).copy()
        for name in remove:
            comps.pop(name, None)
            if name in g:
                g.remove_node(name)
        for name in components:
            if name not in g:
                g.add_node(name, kind="component", role=comps[name].role)
        facts = (set(self.facts) | set(facts_add)) - set(facts_remove)
        return replace(self, components=comps, graph=g, schedule=schedule or self.schedule,
                       facts=frozenset(facts),
                       analyses=dict(self.analyses) if analyses is None else dict(analyses))

    def with_provenance(self, applied: AppliedPass) -> Pipeline:
        return replace(self, provenance=(*self.provenance, applied))

    # ---- saving (diffusers-style names; the work is ndopt.saved's) ----------------------------
    def save_pretrained(self, directory: str | Path, **kwargs: Any) -> Path:
        """Write this pipeline to `directory` (what `ndopt run` writes to RUN/model): pipeline.json and
        safetensors weights; keyword arguments go to `ndopt.saved.save_pipeline` (`max_shard_size`, ...)."""
        from ndopt.saved import save_pipeline

        return save_pipeline(self, directory, **kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs: Any) -> Pipeline:
        """A pipeline written by `save_pretrained` (or `ndopt run`'s RUN/model), rebuilt and checked
        (`ndopt.saved.load_saved`; keyword arguments: `device`)."""
        from ndopt.saved import load_saved

        return load_saved(directory, **kwargs)

    # ---- queries --------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Component:
        try:
            return self.components[name]
        except KeyError:
            raise KeyError(f"pipeline {self.name!r} has no component {name!r}; "
                           f"it has {sorted(self.components)}") from None

    def by_role(self, role: str) -> list[Component]:
        return [c for c in self.components.values() if c.role == role]

    def call_plan(self) -> list[CallSignature]:
        return self.sampler.call_plan(self)

    @property
    def device(self) -> torch.device:
        for c in self.components.values():
            return c.device
        return torch.device("cpu")

    @property
    def is_meta(self) -> bool:
        return self.device.type == "meta"

    def topo_order(self) -> list[str]:
        return [n for n in nx.topological_sort(self.graph) if n in self.components]

    # ---- text ----------------------------------------------------------------------------
    def summary(self) -> str:
        """Stable text of the pipeline's structure (golden-file friendly: no addresses, no timings)."""
        lines = [f"pipeline {self.name}", f"inputs: {', '.join(self.inputs)}", "components:"]
        for name in self.topo_order() + sorted(set(self.components) - set(self.topo_order())):
            c = self.components[name]
            desc = self.sampler.describe(c)
            lines.append(f"  {name} [{c.role}] {type(c.module).__name__} params={c.params():,}"
                         + (f" {desc}" if desc else ""))
            lines.append("    in:  " + ", ".join(f"{p.name}{'?' if p.optional else ''}: {p.spec}" for p in c.inputs))
            lines.append("    out: " + ", ".join(f"{p.name}: {p.spec}" for p in c.outputs))
            for k in sorted(c.attrs):
                if k.startswith("summary."):
                    lines.append(f"    {k[len('summary.'):]}: {c.attrs[k]}")
        lines.append("edges:")
        for src, dst in sorted(self.graph.edges, key=lambda e: (e[0], e[1])):
            ports = ", ".join(f"{a}->{b}" for a, b in self.graph.edges[src, dst]["ports"])
            lines.append(f"  {src} -> {dst}: {ports}")
        lines.extend(self.schedule.summary_lines())
        lines.append(f"facts: {', '.join(sorted(self.facts)) or '-'}")
        lines.append("provenance:" + ("" if self.provenance else " -"))
        for i, p in enumerate(self.provenance, 1):
            cfg = ", ".join(f"{k}={v}" for k, v in sorted(p.config.items()))
            lines.append(f"  {i}. {p.name}({cfg}){'' if p.modified else ' [unchanged]'}")
        return "\n".join(lines) + "\n"
