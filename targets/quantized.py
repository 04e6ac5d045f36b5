"""Quantized components in Qualcomm's formats: a QDQ ONNX per graph, and AIMET encodings.

For every graph (call signature) of a component that the quantization pass replaced by an AIMET
sim, lowering writes:

- `<graph>.qdq.onnx`: the sim exported at that signature by AIMET's QDQ exporter (opset 21, so
  int16 activations and int4 weights are expressible), legalized like the float graphs, and run in
  onnxruntime against the sim on the graph's seeded inputs (errors in the graph's manifest entry).
  This is what AI Hub compiles into a quantized QNN model.
- `<graph>.encodings` (AIMET encodings JSON, version 1.0.0) beside `<graph>.encodings.onnx`: the
  QDQ graph with every QuantizeLinear/DequantizeLinear pair removed; each pair's scale, zero point
  and width become the encoding of the tensor it quantized, keyed to that tensor's name in the
  stripped graph (int32 biases are dequantized back to float initializers). This is the
  float-graph-plus-encodings form (QNN's converter, AI Hub's `.aimet` directory).

Why derive the encodings from the QDQ graph instead of calling `QuantizationSimModel.export`: the
QDQ graph and the encodings then come from one export, so they cannot disagree, and their tensor
names agree with the shipped float graph by construction; AIMET's legacy exporter would trace the
sim a second time per signature. The bundle's own `<graph>.onnx` (onnxsim'd and legalized, which
renames tensors) stays the float path. All three graphs keep their large tensors in the component's
shared weights file (`targets.shared_weights`). Lowering imports no pass: the component's module is
asked duck-typed (`export_onnx`, and its entry point runs the sim). What AIMET logs and warns
while a sim exports reaches the `ndopt.aimet` logger (the sim routes it there); `aimet_log` keeps
it in the bundle's `aimet.log` and says in one line how many warnings went there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from ndopt.errors import LoweringError
from ndopt.io import TMP_PREFIX
from ndopt.ir.component import Component
from targets.lowering import GraphPlan, call_kwargs, release_memory, weight_bytes
from targets.numerics import onnxruntime_outputs, torch_reference
from targets.spec import LegalityRules

ENCODING_VERSION = "1.0.0"
QDQ_REL_TOL = 1e-2  # |qdq - sim| / range(sim): a few 16-bit steps; accumulation order flips roundings

_BITS = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.INT8: 8, TensorProto.UINT8: 8,
         TensorProto.INT16: 16, TensorProto.UINT16: 16, TensorProto.INT32: 32, TensorProto.UINT32: 32}
_SIGNED = {TensorProto.INT4, TensorProto.INT8, TensorProto.INT16, TensorProto.INT32}
AIMET_LOGGER = "ndopt.aimet"  # where a quantized component's sim sends AIMET's records and warnings
AIMET_LOG = "aimet.log"  # kept in the bundle
_open_logs: list[Path] = []  # an enclosing `aimet_log`: the graphs exported inside it write to its file


class _Tally(logging.Handler):
    count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


@contextlib.contextmanager
def aimet_log(path: Path, shown_as: Path | None = None, what: str = "QDQ graphs") -> Iterator[None]:
    """Keep what reaches the `ndopt.aimet` logger while exporting `what` in `path` (appended, created
    on the first record), then one `ndopt` line with how many warnings went there (named `shown_as`:
    the file's place once its directory is in place). Inside another `aimet_log`, that one keeps them
    and says so: wrapped around a bundle's quantized graphs, one line for them all."""
    if _open_logs:
        yield
        return
    lg = logging.getLogger(AIMET_LOGGER)
    lg.propagate = False  # AIMET's thousands of lines stay off the console
    file, tally = logging.FileHandler(path, mode="a", encoding="utf-8", delay=True), _Tally(logging.WARNING)
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for h in (file, tally):
        lg.addHandler(h)
    _open_logs.append(path)
    try:
        yield
    finally:
        _open_logs.pop()
        for h in (file, tally):
            lg.removeHandler(h)
        file.close()
        if tally.count:
            logging.getLogger("ndopt").info("AIMET: %d warnings while exporting %s, written to %s", tally.count, what,
                                            shown_as or path)


def _final(directory: Path) -> Path:
    """The directory `ndopt.io.atomic_dir` will rename its temporary `directory` to."""
    name = directory.name
    return directory.with_name(name[len(TMP_PREFIX):].split("-", 1)[-1]) if name.startswith(TMP_PREFIX) else directory


def is_quantized(component: Component) -> bool:
    """A component whose module is an AIMET sim wrapper (exports QDQ ONNX, keeps its float reference)."""
    m = component.module
    return callable(getattr(m, "export_onnx", None)) and getattr(m, "reference", None) is not None


@dataclass(frozen=True)
class QuantizedGraph:
    """What lowering wrote for one graph of a quantized component: file names and checks (the two
    graphs themselves went to the caller's `save` as they were made)."""

    qdq: str
    encodings: str
    encodings_graph: str
    numerics: dict[str, Any]
    legality: dict[str, Any]
    encodings_count: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {"qdq": self.qdq, "encodings": self.encodings, "encodings_graph": self.encodings_graph,
                "qdq_numerics": self.numerics, "qdq_legality": _legality_summary(self.legality),
                "encodings_count": self.encodings_count}


def _legality_summary(report: dict[str, Any], shown: int = 3) -> dict[str, Any]:
    """The QDQ graph's legality in a few lines (AIMET's export keeps shape arithmetic that the float
    path's onnxsim folds; the full list would dwarf the manifest)."""
    errors = report.get("errors", [])
    return {"ok": report.get("ok", False), "rewrites": report.get("rewrites", {}), "errors": len(errors),
            "first_errors": errors[:shown]}


def lower_quantized(component: Component, plan: GraphPlan, example: dict[str, torch.Tensor], out_dir: Path,
                    rules: LegalityRules, save: Callable[[str, onnx.ModelProto], None]) -> QuantizedGraph:
    """Export, legalize and check the QDQ graph of one graph, derive its encodings and write them into
    `out_dir` (`<graph>.encodings`); the QDQ and encodings graphs go to `save(file, model)` (the
    component's shared weights writer) and are dropped here, one graph's worth in memory at a time."""
    from targets.legality import legalize

    kwargs = call_kwargs(plan, example)
    static = plan.signature.static_dict
    inputs = {k: v for k, v in kwargs.items() if k not in static}
    outputs = [p.name for p in component.outputs]
    with tempfile.TemporaryDirectory(prefix="ndopt-qdq-") as d:
        raw = Path(d) / f"{plan.name}.qdq.onnx"
        try:
            with aimet_log(out_dir / AIMET_LOG, _final(out_dir) / AIMET_LOG, f"the QDQ graph {plan.name}"):
                component.module.export_onnx(inputs, raw, outputs)
        except Exception as e:
            raise LoweringError(f"graph {plan.name}: the AIMET QDQ export of quantized component {component.name!r} "
                                f"failed: {type(e).__name__}: {e}; rerun aimet_quantization, or lower the float "
                                "pipeline") from e
        qdq = onnx.load(str(raw))
    nbytes = weight_bytes(component.module)
    release_memory(nbytes)  # the export's transient copies (several times the weights at real widths)
    qdq = simplify_qdq(qdq, plan.name)
    release_memory(nbytes)
    qdq, report = legalize(qdq, rules, f"{plan.name}.qdq")
    if not report.ok:
        shown = "; ".join(str(v) for v in report.errors[:3])
        raise LoweringError(f"graph {plan.name}: its QDQ graph breaks {len(report.errors)} legality rule(s) no rewrite "
                            f"could fix: {shown}; the float graph passed, so the AIMET export differs: compare both")
    numerics = check_qdq(qdq, component, plan, example)
    if not numerics["ok"]:
        raise LoweringError(f"graph {plan.name}: the QDQ graph differs from the AIMET sim in onnxruntime (max abs err "
                            f"{numerics['max_abs_err']:.3g}, {numerics['rel_err']:.3g} of the output range > "
                            f"{QDQ_REL_TOL}); the export changed the math: compare with `onnx_matches_sim`")
    stripped, enc = encodings_from_qdq(qdq)
    enc_name = f"{plan.name}.encodings"
    (out_dir / enc_name).write_text(json.dumps(enc, indent=1, sort_keys=True))
    files = (f"{plan.name}.qdq.onnx", f"{plan.name}.encodings.onnx")
    save(files[0], qdq)
    del qdq
    save(files[1], stripped)
    del stripped
    release_memory(nbytes)
    return QuantizedGraph(files[0], enc_name, files[1], numerics, report.to_json(),
                          {"activation": len(enc["activation_encodings"]), "param": len(enc["param_encodings"])})


# ---- QDQ graph clean-up -------------------------------------------------------------------------
MOVES = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})  # data movement: values unchanged


def simplify_qdq(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """Fold the shape arithmetic AIMET's export keeps (its traced subtrees have symbolic shapes) with
    onnxsim, without folding any quantization: every tensor a Q/DQ node quantizes is lifted to a
    graph input while onnxsim runs (a Q of a constant weight would otherwise fold to float), then put
    back. Then drop the re-quantization of data movement (see `drop_requantization`)."""
    import onnxsim

    from targets.lowering import _quiet_fds

    g = model.graph
    quantized = {n.input[0] for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    lifted = [i for i in g.initializer if i.name in quantized]
    if lifted:
        kept = [i for i in g.initializer if i.name not in quantized]
        del g.initializer[:]
        g.initializer.extend(kept)
        g.input.extend(onnx.helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in lifted)
    try:
        with _quiet_fds():
            out, _ = onnxsim.simplify(model, check_n=0, perform_optimization=False)
    except Exception as e:  # onnxsim fails on some valid graphs: keep the export (legality reports the rest)
        import logging

        logging.getLogger("ndopt").warning("%s.qdq: onnxsim failed (%s); keeping the exported graph", name, e)
        out = model
    names = {i.name for i in lifted}
    inputs = [i for i in out.graph.input if i.name not in names]
    del out.graph.input[:]
    out.graph.input.extend(inputs)
    out.graph.initializer.extend(lifted)
    drop_requantization(out)
    return out


def drop_requantization(model: onnx.ModelProto) -> int:
    """Remove a Q/DQ pair on the output of a data-movement op (Reshape, Transpose, ...) whose input is
    already dequantized with the same scale and zero point: re-quantizing values already on that grid
    changes nothing (min/max calibration gives a reshape the encoding of its input). It also lets the
    rank-reducing legality rewrite see the unpatchify's Reshape -> Transpose -> Reshape chain."""
    g = model.graph
    consts = _constants(g)
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    outputs = {o.name for o in g.output}

    def same(a: onnx.NodeProto, b: onnx.NodeProto) -> bool:
        try:
            return all(np.array_equal(consts[x], consts[y]) and consts[x].dtype == consts[y].dtype
                       for x, y in zip(a.input[1:3], b.input[1:3])) and len(a.input) == len(b.input)
        except KeyError:
            return False

    drop: set[int] = set()
    rename: dict[str, str] = {}
    for q in g.node:
        if q.op_type != "QuantizeLinear" or q.input[0] not in producer:
            continue
        move = producer[q.input[0]]
        dqs = consumers.get(q.output[0], [])
        up = producer.get(move.input[0]) if move.op_type in MOVES else None
        if up is None or up.op_type != "DequantizeLinear" or len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear":
            continue
        if dqs[0].output[0] in outputs or len(consumers.get(q.input[0], [])) != 1 or not same(q, up):
            continue
        drop.update({id(q), id(dqs[0])})
        rename[dqs[0].output[0]] = q.input[0]
    if drop:
        kept = [n for n in g.node if id(n) not in drop]
        for n in kept:
            for i, x in enumerate(n.input):
                if x in rename:
                    n.input[i] = rename[x]
        del g.node[:]
        g.node.extend(kept)
        _drop_unused(g)
    return len(drop) // 2


def check_qdq(qdq: onnx.ModelProto, component: Component, plan: GraphPlan,
              example: dict[str, torch.Tensor]) -> dict[str, Any]:
    """onnxruntime on the QDQ graph vs the sim (the component's entry) on the same inputs: the largest
    absolute error and that error relative to the sim output's range."""
    ref = torch_reference(component, plan, example)
    types = {i.name: i.type.tensor_type.elem_type for i in qdq.graph.input}
    feeds = {n: example[n].numpy().astype(onnx.helper.tensor_dtype_to_np_dtype(t)) for n, t in types.items()}
    try:
        got = onnxruntime_outputs(qdq, feeds)
    except Exception as e:
        raise LoweringError(f"graph {plan.name}: onnxruntime cannot run its QDQ graph: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
    err, rng = 0.0, 0.0
    for r, g in zip(ref, got):
        if np.issubdtype(r.dtype, np.floating):
            err = max(err, float(np.abs(g.astype(np.float64) - r).max()))
            rng = max(rng, float(r.max() - r.min()))
    rel = err / (rng or 1.0)
    return {"max_abs_err": err, "rel_err": rel, "rel_tol": QDQ_REL_TOL, "ok": bool(rel <= QDQ_REL_TOL)}


# ---- encodings from a QDQ graph ----------------------------------------------------------------
def _constants(g: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def _encoding(name: str, scale: np.ndarray, zp: np.ndarray, zp_type: int, block_size: int | None) -> dict[str, Any]:
    """AIMET 1.0.0: x = scale * (q_u + offset), q_u unsigned; a signed zero point shifts by 2^(bw-1)."""
    bw = _BITS[zp_type]
    scale = np.asarray(scale, dtype=np.float64).reshape(-1)
    zp = np.broadcast_to(np.asarray(zp, dtype=np.int64).reshape(-1), scale.shape)
    signed = zp_type in _SIGNED
    offset = -zp - (2 ** (bw - 1) if signed else 0)
    sym = bool(np.all(zp == 0)) if signed else bool(np.all(zp == 2 ** (bw - 1)))
    enc: dict[str, Any] = {"name": name, "dtype": "INT", "bw": bw, "is_sym": sym,
                           "scale": [float(s) for s in scale], "offset": [int(o) for o in offset],
                           "enc_type": "PER_TENSOR" if scale.size == 1 else "PER_CHANNEL"}
    if block_size:
        enc["enc_type"], enc["block_size"] = "PER_BLOCK", int(block_size)
    return enc


def encodings_from_qdq(qdq: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The float graph (every Q/DQ pair removed) and its AIMET encodings (version 1.0.0).

    A QuantizeLinear -> DequantizeLinear pair on tensor x becomes x's encoding (a parameter's when x
    is an initializer, else an activation's); the pair's output is renamed back to x (or x to the
    pair's output when that is a graph output). A lone DequantizeLinear of an integer initializer (the
    int32 biases) becomes that initializer in float, with its encoding."""
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    g = model.graph
    consts = _constants(g)
    inits = {i.name for i in g.initializer}
    zp_types = {i.name: i.data_type for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            zp_types[n.output[0]] = n.attribute[0].t.data_type
    producer = {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}
    drop: set[int] = set()
    acts: dict[str, dict[str, Any]] = {}
    params: dict[str, dict[str, Any]] = {}
    new_inits: list[onnx.TensorProto] = []

    def attr(n: onnx.NodeProto, key: str) -> Any:
        return next((onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == key), None)

    for dq in g.node:
        if dq.op_type != "DequantizeLinear":
            continue
        src, y = dq.input[0], dq.output[0]
        scale = consts.get(dq.input[1])
        zp_name = dq.input[2] if len(dq.input) > 2 else ""
        zp = consts.get(zp_name, np.zeros(1, np.int64)) if zp_name else np.zeros(1, np.int64)
        zp_type = zp_types.get(zp_name, TensorProto.UINT8)
        q = producer.get(src)
        if scale is None:
            continue
        if q is not None and q.op_type == "QuantizeLinear":
            x = q.input[0]
            enc = _encoding(x, scale, zp, zp_type, attr(dq, "block_size"))
            drop.update({id(q), id(dq)})
            if y in outputs:  # keep the graph's output name: the tensor quantized takes it
                rename[x] = y
                enc["name"] = y
            else:
                rename[y] = x
            (params if x in inits else acts)[enc["name"]] = enc
        elif src in inits:
            axis = attr(dq, "axis")
            axis = 1 if axis is None else axis
            q_arr = consts[src].astype(np.float64)
            s, z = np.asarray(scale, np.float64), np.asarray(zp, np.float64)
            if s.size > 1:
                shape = [1] * q_arr.ndim
                shape[axis] = -1
                s, z = s.reshape(shape), z.reshape(shape)
            new_inits.append(numpy_helper.from_array(((q_arr - z) * s).astype(np.float32), y))
            params[y] = _encoding(y, scale, zp, zp_types.get(src, zp_type), attr(dq, "block_size"))
            drop.add(id(dq))
    kept = [n for n in g.node if id(n) not in drop]
    for n in kept:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
        for i, name in enumerate(n.output):
            if name in rename:
                n.output[i] = rename[name]
    for i in g.input:
        if i.name in rename:
            raise LoweringError(f"graph input {i.name!r} is quantized straight into a graph output: nothing to strip")
    del g.node[:]
    g.node.extend(kept)
    g.initializer.extend(new_inits)
    _drop_unused(g)
    del g.value_info[:]
    enc = {"version": ENCODING_VERSION, "activation_encodings": sorted(acts.values(), key=lambda e: e["name"]),
           "param_encodings": sorted(params.values(), key=lambda e: e["name"]), "excluded_layers": [],
           "producer": {"package": "ndopt", "source": "QDQ graph (targets/quantized.py)"}}
    return model, enc


def _drop_unused(g: onnx.GraphProto) -> None:
    """Remove initializers and Constant nodes nothing reads any more (the pairs' scales and zero points)."""
    while True:
        used = {x for n in g.node for x in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if n.op_type == "Constant" and n.output[0] not in used]
        if not dead:
            break
        ids = {id(n) for n in dead}
        kept = [n for n in g.node if id(n) not in ids]
        del g.node[:]
        g.node.extend(kept)
    used = {x for n in g.node for x in n.input} | {o.name for o in g.output}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


__all__ = ["AIMET_LOG", "ENCODING_VERSION", "QDQ_REL_TOL", "QuantizedGraph", "aimet_log", "check_qdq",
           "encodings_from_qdq", "is_quantized", "lower_quantized"]
