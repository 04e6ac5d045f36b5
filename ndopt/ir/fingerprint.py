"""Cheap identity of what a pipeline computes, to reuse results when nothing changed.

A fingerprint is a hashable value that changes whenever a pass could have changed a module's output:
a different module object, a submodule added, removed or replaced, a parameter or buffer replaced
or modified in place (tensor identity, storage and torch's in-place version counter), a plain
attribute (flag, size, mode) changed, a hook added, or an fx graph rewritten. It is not a hash of
the weights (that is `ndopt.train.data.module_fingerprint`, a cache key across processes): computing
one costs microseconds per tensor, not a pass over the data, and it holds only within one process.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

_SKIP = {"_parameters", "_buffers", "_modules", "training"}
_PLAIN = (bool, int, float, str, bytes, type(None))


def _attr(v: Any) -> Any:
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, (tuple, list)) and all(isinstance(x, _PLAIN) for x in v):
        return (type(v).__name__, tuple(v))
    if isinstance(v, dict) and not v:
        return "{}"
    if isinstance(v, dict):  # hooks and other registries: their entries' identities
        return ("dict", tuple((k if isinstance(k, _PLAIN) else id(k), id(x)) for k, x in v.items()))
    return (type(v).__qualname__, id(v))


def _tensor(t: Any) -> Any:
    if t is None:
        return None
    return (id(t), t.device.type, tuple(t.shape), t.dtype,
            0 if t.device.type == "meta" else t.data_ptr(), t._version)


def module_identity(module: nn.Module) -> tuple:
    """Identity of `module`'s computation: structure, tensors (by identity and version) and attributes."""
    parts: list[Any] = []
    for name, m in module.named_modules(remove_duplicate=False):
        attrs = tuple(sorted((k, _attr(v)) for k, v in vars(m).items() if k not in _SKIP))
        tensors = tuple((k, _tensor(t)) for k, t in [*m._parameters.items(), *m._buffers.items()])
        code = m.code if isinstance(m, fx.GraphModule) else None
        parts.append((name, type(m).__qualname__, id(m), m.training, attrs, tensors, code))
    return tuple(parts)


def sampled_identity(pipeline: Any) -> tuple:
    """Identity of what sampling `pipeline` computes: the components its call plan calls (name, role,
    entry point, module fingerprint), its schedule and its sampler. Components nothing calls (a text
    encoder a pass left behind) do not count."""
    called = sorted({s.component for s in pipeline.call_plan() if s.count})
    comps = tuple((n, pipeline[n].role, pipeline[n].entry, module_identity(pipeline[n].module)) for n in called)
    return comps, pipeline.schedule, (type(pipeline.sampler).__qualname__, id(pipeline.sampler))
