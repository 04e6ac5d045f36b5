"""Recipes: declarative YAML that names a model, an ordered list of passes, targets and policies.

Loading is strict: unknown fields, duplicate keys and YAML tags are errors, and every error names
the file, the line and the field, and lists the allowed values. A recipe is given as a path or as
the name of a shipped recipe (`ndopt run neodragon-8elite`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ndopt.errors import NdoptError, RecipeError
from ndopt.passmanager import Pass, get_pass
from ndopt.recipe_paths import resolve_recipe_path, shipped_recipes  # noqa: F401  (re-exported)

Loc = tuple[Any, ...]
MAX_RECIPE_BYTES = 1 << 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProbeSpec(_Strict):
    """The fidelity probe: fixed prompts and seed at a small resolution (ndopt/eval/probe.py)."""

    prompts: list[str] = Field(default_factory=lambda: [
        "a red circle moving left on a blue background",
        "a yellow square moving up on a dark background",
    ], min_length=1)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    latent_frames: int = Field(2, ge=1)
    height: int = Field(64, ge=64, multiple_of=64)  # 3 pyramid stages x 8x VAE x patch 2
    width: int = Field(64, ge=64, multiple_of=64)
    enabled: bool = True


class VideoSpec(_Strict):
    """The video the optimized pipeline makes, is saved for and is lowered at (each field left out: the
    model's own). `frames` are video frames (1 + 8k for Pyramid-Flow's causal VAE); or `latent_frames`."""

    frames: int | None = Field(None, ge=1)
    latent_frames: int | None = Field(None, ge=1)
    height: int | None = Field(None, ge=1)
    width: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_length(self) -> VideoSpec:
        if self.frames is not None and self.latent_frames is not None:
            raise ValueError("give either `frames` or `latent_frames`, not both")
        return self


class FidelitySpec(_Strict):
    """What happens when a lossy pass leaves its budget: stop with FidelityError, or warn."""

    policy: Literal["stop", "warn"] = "stop"
    budgets: dict[str, float] = Field(default_factory=dict)  # pass -> dB over the probe's videos
    frame_budgets: dict[str, float] = Field(default_factory=dict)  # pass -> dB on the worst frame


class RecipeModel(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    model: str
    passes: list[str | dict[str, dict[str, Any] | None]] = Field(default_factory=list)
    target: str | None = None
    targets: list[str] | None = None
    probe: ProbeSpec = Field(default_factory=ProbeSpec)
    video: VideoSpec | None = None
    fidelity: FidelitySpec = Field(default_factory=FidelitySpec)
    output: str = "runs"
    seed: int = Field(0, ge=0, le=2**63 - 1)
    # image-model: Neodragon's hybrid pipeline (an image model's first frame, 2x super-resolution),
    # built around the model before the passes run (ndopt.frontends.neodragon.hybrid)
    first_frame: Literal["generate", "image-model"] = "generate"

    @model_validator(mode="after")
    def _one_target_field(self) -> RecipeModel:
        if self.target is not None and self.targets is not None:
            raise ValueError("give either `target` or `targets`, not both")
        return self


@dataclass(frozen=True)
class PassSpec:
    name: str
    config: dict[str, Any]
    line: int


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: the model plus instantiated passes, with where each came from."""

    source: str
    spec: RecipeModel
    passes: tuple[PassSpec, ...]
    lines: tuple[tuple[str, int], ...] = ()  # top-level field -> line, for errors found later

    def error(self, field: str, what: str) -> RecipeError:
        """An error about a field found after parsing (e.g. the model cannot be loaded)."""
        line = dict(self.lines).get(field, 1)
        return RecipeError(f"{self.source}:{line}: {field}: {what}")

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def targets(self) -> list[str]:
        if self.spec.targets is not None:
            return list(self.spec.targets)
        return [self.spec.target] if self.spec.target else []

    def instantiate(self) -> list[Pass]:
        return [get_pass(p.name)(p.config) for p in self.passes]

    def with_overrides(self, *, model: str | None = None, target: str | None = None,
                       output: str | None = None) -> Recipe:
        update: dict[str, Any] = {}
        if model:
            update["model"] = model
        if target:
            update["target"], update["targets"] = target, None
        if output:
            update["output"] = output
        recipe = Recipe(self.source, self.spec.model_copy(update=update), self.passes, self.lines)
        if target:
            recipe._check_override_target(target)
        return recipe

    def _check_override_target(self, target: str) -> None:
        """`--target`: known, and accepted by every pass that reads its target (before any work)."""
        from ndopt.passmanager import TargetInfo
        from ndopt.target import available_targets, get_target

        known = available_targets()
        if target not in known:
            raise RecipeError(f"--target {target!r}: unknown target; available: {', '.join(sorted(known)) or '(none)'}")
        info = [TargetInfo.of(get_target(target))]
        for i, (spec, p) in enumerate(zip(self.passes, self.instantiate())):
            check = getattr(p, "check_targets", None)
            for cfg_field, reason in (check(info) if callable(check) else []):
                where = f"passes[{i}].{spec.name}" + (f".{cfg_field}" if cfg_field else "")
                raise RecipeError(f"--target {target!r}: {self.source}:{spec.line}: {where}: {reason}")


# ---- YAML with line numbers -----------------------------------------------------------------
class _Builder:
    """Turns a composed YAML node tree into Python objects, remembering each path's line."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: dict[Loc, int] = {}
        self._seen: set[int] = set()
        self._constructor = yaml.constructor.SafeConstructor()

    def error(self, line: int, what: str) -> RecipeError:
        return RecipeError(f"{self.source}:{line}: {what}")

    def build(self, node: yaml.Node, loc: Loc = ()) -> Any:
        line = node.start_mark.line + 1
        if len(loc) > 32:
            raise self.error(line, f"{_fmt(loc[:3])}...: the recipe nests deeper than 32 levels")
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            if id(node) in self._seen:  # a composed alias is the anchored node again (an alias bomb)
                raise self.error(line, f"{_fmt(loc) or 'recipe'}: YAML anchors and aliases (&name / *name) are not "
                                       "allowed in recipes; write the values out")
            self._seen.add(id(node))
        self.lines[loc] = line
        if isinstance(node, yaml.MappingNode):
            self._check_tag(node, "tag:yaml.org,2002:map", loc)
            out: dict[str, Any] = {}
            for knode, vnode in node.value:
                if not isinstance(knode, yaml.ScalarNode):
                    raise self.error(knode.start_mark.line + 1, f"{_fmt(loc) or 'recipe'}: keys must be plain names")
                self._check_tag(knode, None, loc)
                key = knode.value
                if key == "<<":
                    raise self.error(knode.start_mark.line + 1, "YAML merge keys (<<) are not allowed in recipes")
                if key in out:
                    raise self.error(knode.start_mark.line + 1,
                                     f"{_fmt((*loc, key))}: duplicate key {key!r} (first on line "
                                     f"{self.lines[(*loc, key)]})")
                out[key] = self.build(vnode, (*loc, key))
                self.lines[(*loc, key)] = knode.start_mark.line + 1
            return out
        if isinstance(node, yaml.SequenceNode):
            self._check_tag(node, "tag:yaml.org,2002:seq", loc)
            return [self.build(v, (*loc, i)) for i, v in enumerate(node.value)]
        self._check_tag(node, None, loc)
        return self._constructor.construct_object(node, deep=True)

    _PLAIN_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("map", "seq", "str", "int", "float", "bool", "null"))

    def _check_tag(self, node: yaml.Node, default: str | None, loc: Loc) -> None:
        tag = node.tag or ""
        if tag not in self._PLAIN_TAGS:
            raise self.error(node.start_mark.line + 1,
                             f"{_fmt(loc) or 'recipe'}: YAML tags ({tag}) are not allowed in recipes; "
                             "use plain strings, numbers, lists and mappings")

    def line_of(self, loc: Loc) -> int:
        while loc and loc not in self.lines:
            loc = loc[:-1]
        return self.lines.get(loc, 1)


def _fmt(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _pydantic_error(b: _Builder, e: ValidationError, prefix: Loc, model: type[BaseModel]) -> RecipeError:
    err = e.errors()[0]
    loc = (*prefix, *err["loc"])
    # drop pydantic's union-branch markers such as 'str' / 'dict[str,...]'
    loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float"))))
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        fields = sorted(model.model_fields) if len(loc) == len(prefix) + 1 else None
        allowed = f"; allowed fields: {', '.join(fields)}" if fields else ""
        msg = f"unknown field {loc[-1]!r}{allowed}"
    elif "input" in err and not isinstance(err["input"], (dict, list)):
        msg += f" (got {err['input']!r})"
    return b.error(b.line_of(loc), f"{_fmt(loc) or 'recipe'}: {msg}")


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    b = _Builder(source)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise RecipeError(f"{source}:1: the recipe nests too deeply to read") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = mark.line + 1 if mark else 1
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(f"{source}:{line}: malformed YAML: {problem}") from None
    if node is None:
        raise RecipeError(f"{source}:1: the recipe is empty; it needs at least `name` and `model`")
    data = b.build(node)
    if not isinstance(data, dict):
        raise b.error(1, "a recipe is a mapping of fields (name, model, passes, ...)")
    try:
        spec = RecipeModel(**data)
    except ValidationError as e:
        raise _pydantic_error(b, e, (), RecipeModel) from None

    passes: list[PassSpec] = []
    for i, item in enumerate(spec.passes):
        if isinstance(item, str):
            name, cfg = item, {}
        else:
            if len(item) != 1:
                raise b.error(b.line_of(("passes", i)),
                              f"passes[{i}]: each item is `pass_name` or `{{pass_name: {{config}}}}` with one key, "
                              f"got {sorted(item)}")
            name, cfg = next(iter(item.items()))
            cfg = cfg or {}
        line = b.line_of(("passes", i))
        try:
            cls = get_pass(name)
        except NdoptError as e:
            raise b.error(line, f"passes[{i}]: {e}") from None
        try:
            cls.Config(**cfg)
        except ValidationError as e:
            raise _pydantic_error(b, e, ("passes", i, name), cls.Config) from None
        passes.append(PassSpec(name, dict(cfg), line))

    lines = tuple((k[0], v) for k, v in b.lines.items() if len(k) == 1)
    recipe = Recipe(source, spec, tuple(passes), lines)
    _check_targets(recipe, b)
    _check_requirements(recipe, b)
    _check_passes_against_targets(recipe, b)
    _check_budgets(recipe, b)
    return recipe


def _check_budgets(recipe: Recipe, b: _Builder) -> None:
    """fidelity.budgets / frame_budgets name lossy passes of this recipe (a misspelt name would
    silently leave the pass at its own budget)."""
    from ndopt.passmanager import Lossy, get_pass

    lossy = {s.name for s in recipe.passes if isinstance(get_pass(s.name).fidelity, Lossy)}  # a class's contract
    for field in ("budgets", "frame_budgets"):
        for name in getattr(recipe.spec.fidelity, field):
            if name not in lossy:
                loc: Loc = ("fidelity", field, name)
                raise b.error(b.line_of(loc), f"fidelity.{field}.{name}: not a lossy pass of this recipe; its "
                              f"lossy passes: {', '.join(sorted(lossy)) or '(none)'}")


def _check_targets(recipe: Recipe, b: _Builder) -> None:
    from ndopt.target import available_targets

    known = available_targets()
    field = "targets" if recipe.spec.targets is not None else "target"
    for i, t in enumerate(recipe.targets):
        if t not in known:
            loc: Loc = ("targets", i) if field == "targets" else ("target",)
            raise b.error(b.line_of(loc), f"{_fmt(loc)}: unknown target {t!r}; available: "
                          f"{', '.join(sorted(known)) or '(none)'}")


def _check_passes_against_targets(recipe: Recipe, b: _Builder) -> None:
    """A pass that reads its target (the quantization pass's HTP config) may refuse the recipe's
    targets at load: a pass offering `check_targets(targets) -> [(config field or None, reason)]`
    is asked, with the targets' `TargetInfo`s. The core names no pass: it only asks."""
    from ndopt.passmanager import TargetInfo
    from ndopt.target import get_target

    if not recipe.targets:
        return
    infos = [TargetInfo.of(get_target(t)) for t in recipe.targets]
    field = "targets" if recipe.spec.targets is not None else "target"
    for i, (spec, p) in enumerate(zip(recipe.passes, recipe.instantiate())):
        check = getattr(p, "check_targets", None)
        for cfg_field, reason in (check(infos) if callable(check) else []):
            loc: Loc = ("passes", i, spec.name, cfg_field) if cfg_field else ("passes", i)
            where = f"passes[{i}].{spec.name}" + (f".{cfg_field}" if cfg_field else "")
            raise b.error(b.line_of(loc), f"{where}: {reason} ({field} on line {b.line_of((field,))})")


def _check_requirements(recipe: Recipe, b: _Builder) -> None:
    from ndopt.passmanager import check_requirements

    passes = recipe.instantiate()
    for i in range(len(passes)):
        try:
            check_requirements(passes[: i + 1])
        except NdoptError as e:
            raise b.error(recipe.passes[i].line, f"passes[{i}]: {e}") from None


def load_recipe(ref: str | Path) -> Recipe:
    path = resolve_recipe_path(ref)
    try:
        if not path.is_file():
            raise RecipeError(f"{path}: cannot read the recipe: not a regular file")
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: {size} bytes is not a recipe (at most {MAX_RECIPE_BYTES}; a recipe is a short "
                              "YAML file)")
        data = path.read_bytes()
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RecipeError(f"{path}:{line}: not a text recipe: byte {data[e.start]:#04x} at offset {e.start} is not "
                          "UTF-8 (a recipe is a YAML text file)") from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise RecipeError(f"{path}:{line}: not a text recipe: it contains NUL bytes (a recipe is a YAML text file)")
    return parse_recipe(text, str(path))
