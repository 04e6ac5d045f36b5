"""What `ndopt passes` prints: each pass's one-line summary, and one pass's documentation.

A pass documents itself: its docstring, its `fidelity` contract, the facts it `requires`,
`provides` and `invalidates` (ndopt.passmanager), and its pydantic `Config`, whose fields carry a
type, a default, constraints and a `description`. This module reads those and nothing else, so
what a user reads is what the recipe loader validates. Nested configs (a pass's `data`, a training
stage) are listed field by field under dotted keys, as a recipe writes them.
"""

from __future__ import annotations

import inspect
import json
import types
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from ndopt.passmanager import Exact, Lossy, Pass, available_passes, get_pass, providers_of

MAX_DEFAULT = 100  # characters of a default shown whole; a longer list shows its first item and its length


@dataclass(frozen=True)
class FieldDoc:
    """One recipe key of a pass config: `key` dotted from the pass's config (`data.clips`; a list of
    configs as `overrides[].pattern`), its type, constraints, default (None: required) and description."""

    key: str
    type: str
    constraints: tuple[str, ...]
    default: str | None
    description: str


def summary(cls: type[Pass]) -> str:
    """The first line of the pass's docstring."""
    doc = inspect.getdoc(cls) or ""
    return doc.splitlines()[0] if doc else ""


def summaries() -> dict[str, str]:
    """{name: one line} of every registered pass (built-in and plugins)."""
    return {name: summary(cls) for name, cls in available_passes().items()}


def _constraint(m: Any) -> str | None:
    """annotated_types' constraint objects (what Field(ge=..., min_length=...) stores) in words."""
    words = {"ge": ">= {}", "gt": "> {}", "le": "<= {}", "lt": "< {}", "multiple_of": "multiple of {}",
             "min_length": "length >= {}", "max_length": "length <= {}"}
    for attr, fmt in words.items():
        v = getattr(m, attr, None)
        if v is not None:
            return fmt.format(v)
    return None


def _constraints(metadata: list[Any]) -> tuple[str, ...]:
    return tuple(c for c in map(_constraint, metadata) if c)


def type_name(tp: Any) -> str:
    """A type as a recipe writer reads it: `int`, `list[str] | None`, `'w8a16' | 'w4a16'`."""
    if tp is type(None):
        return "null"
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin is Union or origin is types.UnionType:
        return " | ".join(type_name(a) for a in args)
    if origin is Annotated:
        inner = type_name(args[0])
        metadata = [m for a in args[1:] for m in (a.metadata if isinstance(a, FieldInfo) else [a])]
        cons = _constraints(metadata)
        return f"{inner} ({', '.join(cons)})" if cons else inner
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _models_in(tp: Any, listed: bool = False) -> list[tuple[type[BaseModel], bool]]:
    """The config models a field's type holds, each with whether it sits in a list (`key[]`)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [(tp, listed)]
    origin = get_origin(tp)
    in_list = listed or origin in (list, tuple, set, frozenset)
    return [m for a in get_args(tp) for m in _models_in(a, in_list)]


def _default(field: FieldInfo) -> str | None:
    if field.default_factory is not None:
        value = field.default_factory()  # ndopt's factories take no arguments
    elif field.default is PydanticUndefined:
        return None
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(the defaults below)"
    try:
        text = json.dumps(value)
    except TypeError:  # a Path
        return str(value)
    if isinstance(value, list | tuple) and len(value) > 1 and len(text) > MAX_DEFAULT:
        return f"[{json.dumps(value[0])}, ...] ({len(value)} items)"
    return text


def config_fields(model: type[BaseModel], prefix: str = "") -> list[FieldDoc]:
    """Every field of a config model, nested configs expanded after the field that holds them."""
    out: list[FieldDoc] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        out.append(FieldDoc(key, type_name(field.annotation), _constraints(field.metadata), _default(field),
                            (field.description or "").strip()))
        for sub, listed in _models_in(field.annotation):
            out += config_fields(sub, f"{key}[]." if listed else f"{key}.")
    return out


def _fidelity(cls: type[Pass]) -> str:
    f = cls.fidelity
    if isinstance(f, Exact):
        return f"exact: the output stays within {f.tolerance:g} (relative L-inf) of the pipeline's before the pass"
    if isinstance(f, Lossy):
        frame = "" if f.frame_budget_db is None else f", its worst frame >= {f.frame_budget_db:g} dB"
        return (f"lossy: {f.metric} vs the pipeline before the pass stays >= {f.budget_db:g} dB{frame} "
                "(the recipe's probe)")
    return f"{f.kind}: the pipeline's output does not change"


def _facts(facts: tuple[str, ...], with_providers: bool = False) -> str:
    if not facts:
        return "-"
    if not with_providers:
        return ", ".join(facts)
    return ", ".join(f"{f} (from {', '.join(providers_of(f)) or 'no registered pass'})" for f in facts)


def describe(name: str) -> str:
    """`ndopt passes NAME`: the pass's docstring, contract, facts and config schema, as text.
    An unknown name raises PassError listing the registered passes."""
    cls = get_pass(name)
    lines = [f"{cls.name} ({cls.__module__}.{cls.__qualname__})", ""]
    lines += [f"  {line}".rstrip() for line in (inspect.getdoc(cls) or "(no docstring)").splitlines()]
    lines += ["", f"fidelity:    {_fidelity(cls)}",
              f"requires:    {_facts(tuple(cls.requires), with_providers=True)}",
              f"provides:    {_facts(tuple(cls.provides))}",
              f"invalidates: {_facts(tuple(cls.invalidates))}", ""]
    fields = config_fields(cls.Config)
    if not fields:
        lines.append("config: none (the pass takes no options)")
        return "\n".join(lines) + "\n"
    nested = any("." in f.key for f in fields)
    lines.append(f"config (recipe: `- {cls.name}: {{key: value, ...}}`"
                 + ("; `a.b` is `a: {b: ...}`, `a[].b` a key of each item of the list `a`" if nested else "") + "):")
    for f in fields:
        cons = f" ({', '.join(f.constraints)})" if f.constraints else ""
        default = " required" if f.default is None else f" = {f.default}"
        lines.append(f"  {f.key}: {f.type}{cons}{default}")
        if f.description:
            lines.append(f"      {f.description}")
    return "\n".join(lines) + "\n"


__all__ = ["FieldDoc", "config_fields", "describe", "summaries", "summary", "type_name"]
