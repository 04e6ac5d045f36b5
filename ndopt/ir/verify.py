"""The IR verifier: the flow graph, the edge types, the fx graphs and the schedule agree.

Run after every pass by the PassManager. Shape checks run each component's entry point once per
call signature without computing anything (fake tensors, see ndopt.ir.cost.shape_mode), sharing
those runs with the cost analysis.
"""

from __future__ import annotations

import networkx as nx
from torch import fx

from ndopt.errors import VerificationError
from ndopt.ir.cost import CostModel
from ndopt.ir.pipeline import SINK, Pipeline
from ndopt.ir.spec import Port, TensorSpec


def _port_map(pipeline: Pipeline, node: str, *, output: bool) -> dict[str, Port]:
    if node in pipeline.components:
        c = pipeline.components[node]
        return {p.name: p for p in (c.outputs if output else c.inputs)}
    if node == SINK:
        return {} if output else {p.name: p for p in pipeline.sink}
    return {p.name: p for p in pipeline.sources.get(node, ())} if output else {}


def _same_template(a: TensorSpec, b: TensorSpec) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype


def verify_structure(pipeline: Pipeline) -> None:
    """Graph, ports and edge types, fx lint, schedule/component agreement (no forward)."""
    g = pipeline.graph
    problems: list[str] = []
    if not nx.is_directed_acyclic_graph(g):
        cycle = nx.find_cycle(g)
        raise VerificationError(f"pipeline {pipeline.name!r}: data-flow graph has a cycle: {cycle}")
    comp_nodes = {n for n, d in g.nodes(data=True) if d.get("kind") == "component"}
    if comp_nodes != set(pipeline.components):
        problems.append(f"graph components {sorted(comp_nodes)} != pipeline components {sorted(pipeline.components)}")
    if SINK not in g:
        problems.append("graph has no 'video' sink")
    for src in pipeline.inputs:
        if src not in pipeline.sources:
            problems.append(f"active input {src!r} is not a declared source ({sorted(pipeline.sources)})")
    reachable: set[str] = set()  # from the active inputs
    for src in pipeline.inputs:
        if src in g:
            reachable |= nx.descendants(g, src) | {src}
    fed_any: set[str] = set()  # from any declared source (dead for this input mode is allowed)
    for src in pipeline.sources:
        if src in g:
            fed_any |= nx.descendants(g, src)
    for name in sorted(pipeline.components):
        if name not in g:
            continue
        if name not in fed_any:
            problems.append(f"component {name!r} is not reachable from any input {sorted(pipeline.sources)}")
        elif SINK in g and not nx.has_path(g, name, SINK):
            problems.append(f"component {name!r} has no path to the video")
    if SINK in g and SINK not in reachable:  # the video must be computable from the active inputs
        problems.append(f"the video is not reachable from the inputs {list(pipeline.inputs)}")

    fed: dict[str, set[str]] = {n: set() for n in pipeline.components}
    fed[SINK] = set()
    for src, dst, data in g.edges(data=True):
        outs = _port_map(pipeline, src, output=True)
        ins = _port_map(pipeline, dst, output=False)
        for a, b in data.get("ports", ()):
            if a not in outs:
                problems.append(f"edge {src}->{dst}: {src!r} has no output port {a!r} (has {sorted(outs)})")
                continue
            if b not in ins:
                problems.append(f"edge {src}->{dst}: {dst!r} has no input port {b!r} (has {sorted(ins)})")
                continue
            if not _same_template(outs[a].spec, ins[b].spec):
                problems.append(f"edge {src}->{dst}: {src}.{a} is {outs[a].spec} but {dst}.{b} expects {ins[b].spec}")
            if b in fed.get(dst, set()):
                problems.append(f"edge {src}->{dst}: input {dst}.{b} has more than one producer")
            fed.setdefault(dst, set()).add(b)
    for name, comp in pipeline.components.items():
        for p in comp.inputs:
            if not p.optional and p.name not in fed.get(name, set()):
                problems.append(f"component {name!r}: required input {p.name!r} has no producer")
    for p in pipeline.sink:
        if p.name not in fed.get(SINK, set()):
            problems.append(f"the video output {p.name!r} has no producer")

    for name, comp in pipeline.components.items():
        for mod_name, mod in comp.module.named_modules():
            if isinstance(mod, fx.GraphModule):
                try:
                    mod.graph.lint()
                except Exception as e:  # lint raises plain RuntimeErrors
                    problems.append(f"component {name!r}: fx graph {mod_name or '<root>'} fails lint: {e}")

    sched = pipeline.schedule
    if not sched.stages:
        problems.append("schedule has no stages")
    for i, s in enumerate(sched.stages):
        if s.steps < 0 or s.video_steps < 0 or (s.steps == 0 and s.video_steps == 0):
            problems.append(f"schedule stage {i}: steps {s.steps}/{s.video_steps} must be >= 0 and not both 0")
    if problems:
        raise VerificationError(f"pipeline {pipeline.name!r} fails verification: " + "; ".join(problems))


def verify_calls(pipeline: Pipeline, costs: CostModel | None = None) -> None:
    """Every call signature runs (for shapes) and produces what the component's ports declare.

    Shares its shape runs with `costs` (a CostModel) when given: costing afterwards is free."""
    costs = costs or CostModel()
    problems: list[str] = []
    plan = pipeline.call_plan()
    for sig in plan:
        if sig.component not in pipeline.components:
            problems.append(f"call plan names unknown component {sig.component!r}")
            continue
        comp = pipeline.components[sig.component]
        env = sig.env_dict
        ports = {p.name: p for p in comp.inputs}
        for name, spec in sig.args:
            if name not in ports:
                problems.append(f"{comp.name}@{sig.key}: argument {name!r} is not an input port")
                continue
            last = spec[-1] if isinstance(spec, tuple) else spec
            if not ports[name].spec.bind(env).accepts(tuple(int(d) for d in last.shape), last.torch_dtype):
                problems.append(f"{comp.name}@{sig.key}: {name} is {last}, port expects {ports[name].spec.bind(env)}")
        try:
            outs = costs.run(comp, sig).outputs
        except Exception as e:  # any failure of the module at this signature is a verification failure
            problems.append(f"{comp.name}@{sig.key}: forward fails: {type(e).__name__}: {e}")
            continue
        if len(outs) != len(comp.outputs):
            problems.append(f"{comp.name}@{sig.key}: returns {len(outs)} outputs, ports declare {len(comp.outputs)}")
            continue
        for port, (shape, dtype) in zip(comp.outputs, outs):
            want = port.spec.bind(env)
            if not want.accepts(shape, dtype):
                problems.append(f"{comp.name}@{sig.key}: output {port.name} is {dtype}{list(shape)}, port declares {want}")
    dit_calls = sum(s.count for s in plan if s.component in pipeline.components
                    and pipeline.components[s.component].role == "dit")
    if pipeline.by_role("dit") and dit_calls != pipeline.schedule.dit_calls_per_video:
        problems.append(f"call plan has {dit_calls} DiT calls per video, the schedule says "
                        f"{pipeline.schedule.dit_calls_per_video}")
    if problems:
        raise VerificationError(f"pipeline {pipeline.name!r} fails call verification: " + "; ".join(problems))


def verify(pipeline: Pipeline, *, calls: bool = True, costs: CostModel | None = None) -> None:
    verify_structure(pipeline)
    if calls:
        verify_calls(pipeline, costs)


