"""The weights of a saved pipeline: every component's state dict (and its non-persistent buffers) in
safetensors, written by huggingface_hub (one file, or shards and an index) and loaded back strictly.

Split from ndopt.saved (which holds the manifest and the replay): what is written under which key,
how a wrapper component's float weights are found, and how a meta-built pipeline takes the tensors.
Also the two checks every weight load shares (here and the frontends' checkpoint readers): a tensor's
dtype kind against the module's (`dtype_mismatches`) and finiteness (`check_finite`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ndopt.errors import CheckpointError
from ndopt.ir.pipeline import Pipeline

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
RESERVED = "_ndopt."  # weight keys of records (analyses tables, non-persistent buffers), never a component's
BUFFERS = RESERVED + "buffers."


def dtype_kind(dtype: torch.dtype) -> str:
    """float, complex, bool or integer: float16, bfloat16, float32 and float64 are one kind (converted on load)."""
    if dtype.is_floating_point:
        return "float"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "integer"


def dtype_mismatches(expected: Mapping[str, Tensor], got: Mapping[str, Tensor], *, prefix: str = "",
                     stored: str = "checkpoint", model: str = "model") -> list[str]:
    """`key: checkpoint int32 vs model float32` for each tensor of `got` whose dtype kind differs from the
    module's: loading would cast it silently (assign=False) or put an integer tensor where a float one
    belongs (assign=True); different float widths are fine."""
    return [f"{prefix}{k}: {stored} {str(t.dtype).removeprefix('torch.')} vs {model} "
            f"{str(expected[k].dtype).removeprefix('torch.')}"
            for k, t in got.items()
            if k in expected and dtype_kind(t.dtype) != dtype_kind(expected[k].dtype)]


def check_finite(key: str, tensor: Tensor, file: Path | str, stored: torch.dtype | None = None) -> None:
    """CheckpointError naming `key`, `file` and the NaN/inf count when a floating `tensor` is not finite.

    `stored` is the file's dtype when `tensor` was converted from it: then the non-finite values are the
    conversion's overflow, and the message says so."""
    if not tensor.is_floating_point() or tensor.is_meta or bool(torch.isfinite(tensor).all()):
        return
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    dtype = str(tensor.dtype).removeprefix("torch.")
    where = f"{file}: tensor {key!r} ({dtype}, shape {tuple(tensor.shape)})"
    if stored is not None and stored != tensor.dtype:
        raise CheckpointError(f"{where}: {inf} of {tensor.numel()} values overflow {dtype} (they are finite as "
                              f"stored in {str(stored).removeprefix('torch.')}); load the weights in a wider "
                              "dtype (float32)")
    raise CheckpointError(f"{where} holds {nan} NaN and {inf} inf of {tensor.numel()} values; the weights are "
                          "corrupt or come from a diverged run: download or export them again")


def float_module(module: nn.Module) -> nn.Module:
    """The module whose weights are saved: a wrapper (an AIMET sim's `QuantizedComponent`) exposes its
    float module as `.reference`; the pass that made the wrapper rebuilds it on load (`Pass.restore`)."""
    ref = getattr(module, "reference", None)
    return ref if isinstance(ref, nn.Module) and ref is not module else module


def component_weights(pipeline: Pipeline) -> dict[str, torch.Tensor]:
    """`<component>.<state key>` for every component, plus the non-persistent buffers (which state
    dicts leave out) under `_ndopt.buffers.`; shared or strided tensors are cloned (safetensors)."""
    out: dict[str, torch.Tensor] = {}
    for name, comp in pipeline.components.items():
        module = float_module(comp.module)
        state = module.state_dict()
        meta = [k for k, t in state.items() if t.is_meta]
        if meta:
            raise CheckpointError(f"cannot save pipeline {pipeline.name!r}: component {name!r} has meta tensors "
                                  f"({meta[:3]}); a plan-mode pipeline has no weights to save")
        out.update({f"{name}.{k}": t for k, t in state.items()})
        for k, b in module.named_buffers():
            if k not in state:
                out[f"{BUFFERS}{name}.{k}"] = b
    seen: set[tuple[str, int]] = set()
    for k, t in out.items():
        t = t.detach()
        sid = (str(t.device), t.untyped_storage().data_ptr())
        if sid in seen or not t.is_contiguous() or t.device.type != "cpu":
            t = t.to("cpu").clone(memory_format=torch.contiguous_format)
        seen.add(sid)
        out[k] = t
    return out


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """No tqdm bar from huggingface_hub's writer (library code does not print; STYLE rule 7)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was:
            enable_progress_bars()


def inside(directory: Path, rel: str, field: str) -> Path:
    """`directory / rel` resolved, refused unless it stays inside `directory`: a path read from a saved
    pipeline's files (`field` names where) must not reach outside it (`../`, an absolute path, a link)."""
    root = Path(directory).resolve()
    path = (root / str(rel)).resolve()
    if not path.is_relative_to(root):
        raise CheckpointError(f"{directory}: {field} is {rel!r}, which resolves to {path}, outside the saved "
                              "pipeline's directory; the file was edited or not written by ndopt")
    return path


def _weight_map(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{index}: unreadable shard index ({e}); the save was interrupted or the file "
                              "edited: save the pipeline again") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if (not isinstance(weight_map, dict) or not weight_map
            or not all(isinstance(f, str) and f for f in weight_map.values())):
        raise CheckpointError(f"{index}: malformed shard index: expected an object with a non-empty 'weight_map' "
                              "of tensor name -> shard file; save the pipeline again")
    return weight_map


def read_weights(directory: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a saved pipeline, on `device`: `model.safetensors`, or the shards its index names.

    Every floating tensor of a component (and every saved buffer) must be finite: the first that is not
    is named with its file and NaN/inf count."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = directory / WEIGHTS_INDEX
    if index.is_file():
        weight_map = _weight_map(index)
        files = sorted(set(weight_map.values()))
    elif (directory / WEIGHTS).is_file():
        weight_map, files = None, [WEIGHTS]
    else:
        raise CheckpointError(f"{directory}: no {WEIGHTS} or {WEIGHTS_INDEX}; the weights are missing")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        path = inside(directory, f, f"{WEIGHTS_INDEX} weight_map file")
        if not path.is_file():
            raise CheckpointError(f"{directory}: the index names {f}, which is missing; copy the whole directory")
        try:
            part = load_file(str(path), device=str(torch.device(device)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it is truncated or corrupt: "
                                  "save the pipeline again") from None
        for k, t in part.items():
            if not k.startswith(RESERVED) or k.startswith(BUFFERS):  # records (analyses tables) may hold inf
                check_finite(k, t, path)
        out.update(part)
    if weight_map is not None and set(weight_map) != set(out):
        raise CheckpointError(f"{directory}: the shards do not hold what {WEIGHTS_INDEX} lists")
    return out


def load_weights(pipeline: Pipeline, weights: Mapping[str, torch.Tensor], source: str) -> None:
    """Every component's state dict from `weights`, strictly: all problems (missing, unexpected, shape and
    dtype-kind mismatches) listed in one CheckpointError."""
    missing, unexpected, mismatched, dtypes = [], [], [], []
    per: dict[str, dict[str, torch.Tensor]] = {n: {} for n in pipeline.components}
    buffers: dict[str, dict[str, torch.Tensor]] = {n: {} for n in pipeline.components}
    for k, t in weights.items():
        if k.startswith(BUFFERS):
            name, _, rest = k[len(BUFFERS):].partition(".")
            if name in buffers:
                buffers[name][rest] = t
            continue
        if k.startswith(RESERVED):
            continue
        name, _, rest = k.partition(".")
        if name in per:
            per[name][rest] = t
        else:
            unexpected.append(k)
    for name, comp in pipeline.components.items():
        expected = float_module(comp.module).state_dict()
        got = per[name]
        missing += [f"{name}.{k}" for k in expected if k not in got]
        unexpected += [f"{name}.{k}" for k in got if k not in expected]
        mismatched += [f"{name}.{k}: saved {tuple(t.shape)} vs rebuilt {tuple(expected[k].shape)}"
                       for k, t in got.items() if k in expected and t.shape != expected[k].shape]
        dtypes += dtype_mismatches(expected, got, prefix=f"{name}.", stored="saved", model="rebuilt")
        module_buffers = dict(float_module(comp.module).named_buffers())
        dtypes += dtype_mismatches(module_buffers, buffers[name], prefix=f"{BUFFERS}{name}.", stored="saved",
                                   model="rebuilt")
    if missing or unexpected or mismatched or dtypes:
        parts = [f"{len(v)} {what} ({', '.join(v[:8])}{', ...' if len(v) > 8 else ''})"
                 for what, v in (("missing keys", missing), ("unexpected keys", unexpected),
                                 ("shape mismatches", mismatched), ("dtype mismatches", dtypes)) if v]
        raise CheckpointError(f"{source}: the saved weights do not fit the pipeline rebuilt from its provenance: "
                              f"{'; '.join(parts)}. Was the directory written by another ndopt version, or its "
                              "files mixed with another run's?")
    for name, comp in pipeline.components.items():
        module = float_module(comp.module)
        meta = any(t.is_meta for t in module.state_dict().values())
        tied = _tied_groups(module) if meta else []
        module.load_state_dict(per[name], strict=True, assign=meta)
        for group in tied:  # assign replaced each name's tensor on its own: tie them again
            first = module.get_parameter(group[0])
            for k in group[1:]:
                owner, _, attr = k.rpartition(".")
                module.get_submodule(owner)._parameters[attr] = first
        for k, b in buffers[name].items():
            owner, _, attr = k.rpartition(".")
            sub = module.get_submodule(owner)
            have = sub._buffers.get(attr)
            if have is not None:  # the module's device; a meta-built module's: where the weights were read
                sub._buffers[attr] = b if have.is_meta else b.to(have.device, have.dtype)


def _tied_groups(module: nn.Module) -> list[list[str]]:
    """Parameter names that are one tensor in the module (tied embeddings, e.g. T5's shared)."""
    by_id: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]
