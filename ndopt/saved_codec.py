"""Typed JSON for the records a saved pipeline holds (schedules, configs, analyses, the sampler).

Frozen dataclasses, tuples, dicts with non-string keys and tensors do not survive plain JSON: a
`Schedule` comes back as nested dicts and lists, a `FoldedSchedule`'s rows lose their tuple keys.
`encode` tags them (`__dataclass__` with its import path, `__tuple__`, `__items__`, `__tensor__`
with a key into a side table of tensors that the caller stores in the weights) and `decode`
rebuilds them. Only dataclasses and enums defined in ndopt's own packages are rebuilt, and only
`torch.dtype`s come back from `__dtype__` (a saved file names the classes it holds: calling arbitrary
classes with arguments from a file would be a hole). A class outside those packages is `Unencodable`
(a third-party dataclass ndopt wrote: the value is kept from the replay); a tag that `encode` never
writes (a class that is not a dataclass or enum, a dtype that is not a dtype) is `Refused`: the file
was crafted or edited.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["TRUSTED_PACKAGES", "Refused", "Unencodable", "class_path", "decode", "encode"]

TRUSTED_PACKAGES = ("ndopt", "passes", "targets")


class Unencodable(TypeError):
    """A value has no typed-JSON form (a module, a function, an open file)."""


class Refused(ValueError):
    """A tagged value `encode` cannot have written: not rebuilt (the loader refuses the file)."""


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _trusted(module: str) -> bool:
    return module.split(".")[0] in TRUSTED_PACKAGES


def _import_class(path: str, kind: Callable[[type], bool], what: str) -> type:
    """The class at `path` (`module:qualname`) if it is defined in a trusted package and is `what`."""
    module, _, qual = str(path).partition(":")
    if not _trusted(module):
        raise Unencodable(f"class {path} is outside {TRUSTED_PACKAGES}: not rebuilt from a file")
    obj: Any = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    # the qualname may walk through a module the trusted one imports (`ndopt.saved:tempfile.X`)
    if not isinstance(obj, type) or not _trusted(obj.__module__) or not kind(obj):
        raise Refused(f"{path} is not {what} defined in {TRUSTED_PACKAGES}: not rebuilt from a file")
    return obj


def _dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise Refused(f"__dtype__ {name!r} is not a torch dtype")
    return dtype


def _json_key(encoded: Any) -> str:
    """An order for encoded set members of any kind (tuples encode as dicts, which do not compare)."""
    return json.dumps(encoded, sort_keys=True)


def encode(x: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """`x` as typed JSON; tensors go into `tensors` under `key` (dotted paths below it)."""
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return {"__float__": str(x)} if math.isinf(x) or math.isnan(x) else x
    if isinstance(x, enum.Enum):
        return {"__enum__": class_path(type(x)), "value": encode(x.value, tensors, key)}
    if isinstance(x, torch.Tensor):
        tensors[key] = x.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(x, torch.dtype):
        return {"__dtype__": str(x).removeprefix("torch.")}
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        fields = {f.name: encode(getattr(x, f.name), tensors, f"{key}.{f.name}")
                  for f in dataclasses.fields(x) if f.init}
        return {"__dataclass__": class_path(type(x)), "fields": fields}
    if hasattr(x, "model_dump") and callable(x.model_dump):  # a pydantic config: its JSON form
        return x.model_dump(mode="json")
    if isinstance(x, tuple):
        return {"__tuple__": [encode(v, tensors, f"{key}.{i}") for i, v in enumerate(x)]}
    if isinstance(x, list):
        return [encode(v, tensors, f"{key}.{i}") for i, v in enumerate(x)]
    if isinstance(x, (set, frozenset)):
        return {"__set__": sorted((encode(v, tensors, key) for v in x), key=_json_key)}
    if isinstance(x, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in x):
            return {k: encode(v, tensors, f"{key}.{k}") for k, v in x.items()}
        return {"__items__": [[encode(k, tensors, f"{key}.k{i}"), encode(v, tensors, f"{key}.v{i}")]
                              for i, (k, v) in enumerate(x.items())]}
    raise Unencodable(f"{key}: a {type(x).__name__} has no JSON form")


def decode(x: Any, tensors: Callable[[str], torch.Tensor]) -> Any:
    """The value `encode` wrote; `tensors(key)` returns a stored tensor."""
    if isinstance(x, list):
        return [decode(v, tensors) for v in x]
    if not isinstance(x, dict):
        return x
    if "__float__" in x:
        return float(x["__float__"])
    if "__tensor__" in x:
        return tensors(x["__tensor__"])
    if "__dtype__" in x:
        return _dtype(x["__dtype__"])
    if "__tuple__" in x:
        return tuple(decode(v, tensors) for v in x["__tuple__"])
    if "__set__" in x:
        return frozenset(decode(v, tensors) for v in x["__set__"])
    if "__items__" in x:
        return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in x["__items__"]}
    if "__enum__" in x:
        return _import_class(x["__enum__"], lambda c: issubclass(c, enum.Enum), "an enum")(decode(x["value"], tensors))
    if "__dataclass__" in x:
        cls = _import_class(x["__dataclass__"], dataclasses.is_dataclass, "a dataclass")
        return cls(**{k: decode(v, tensors) for k, v in x["fields"].items()})
    return {k: decode(v, tensors) for k, v in x.items()}


def _hashable(k: Any) -> Any:
    return tuple(_hashable(v) for v in k) if isinstance(k, list) else k
