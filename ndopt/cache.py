"""ndopt's on-disk caches: work a later command can reuse, keyed so it never answers stale.

Every key includes what the result depends on and the code that computes it (the source of ndopt,
its passes and targets with their bundled weights' headers (tensor shapes and metadata: a teacher
reinstalled under the same name at another architecture misses; plans, built on the meta device, do
not read weight values), the versions of torch, transformers and the other model libraries, and the
installed plugins), so an edit or an upgrade misses instead of answering old figures:

- `plans/`: a whole `ndopt plan` answer (its JSON and report files) for the same arguments, recipe
  text, model (a preset, or a checkpoint directory's configs) and targets; read without importing
  torch, so a repeated plan prints at once.
- `shapes/`: one meta component's FLOPs, bytes and output shapes at one call signature, keyed by the
  module's structure (ndopt.ir.cost), so a new recipe or target on a known preset skips the shape
  runs of the components it shares.
- `latents/`: training clips encoded by a VAE encoder (ndopt.train.data.LatentCache, keyed by the
  data, the size and the encoder's weights), shared by every run instead of one run directory.

The directory is `$NDOPT_CACHE_DIR`, else `$XDG_CACHE_HOME/ndopt`, else `~/.cache/ndopt`;
`NDOPT_CACHE=0` turns all of them off. Entries are written atomically; an unreadable one is a miss.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from functools import cache
from importlib import metadata, resources
from pathlib import Path
from typing import Any

SOURCE_PACKAGES = ("ndopt", "passes", "targets", "recipes")
SOURCE_SUFFIXES = (".py", ".yaml", ".yml", ".json", ".tsv", ".txt")
VERSIONED = ("torch", "transformers", "diffusers", "onnx", "aimet-torch")
RESULT = "ndopt-plan-result.json"  # beside the report files (plan.json, report.md, plots)
MAX_CONFIG_BYTES = 1 << 20  # a checkpoint directory's files hashed by content below this, else by name and size


def enabled() -> bool:
    return os.environ.get("NDOPT_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    if os.environ.get("NDOPT_CACHE_DIR"):
        return Path(os.environ["NDOPT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ndopt"


def shared_dir(kind: str) -> Path | None:
    """A cache subdirectory for files keyed by the caller, per code version; None when caching is off."""
    return cache_dir() / kind / code_version()[:16] if enabled() else None


def _hash_files(h: Any, root: Path, skip_dirs: tuple[str, ...] = ("__pycache__",)) -> None:
    for p in sorted(root.rglob("*")):
        if any(part in skip_dirs for part in p.relative_to(root).parts) or not p.is_file():
            continue
        h.update(str(p.relative_to(root)).encode())
        if p.suffix in SOURCE_SUFFIXES and p.stat().st_size <= MAX_CONFIG_BYTES:
            h.update(p.read_bytes())
        elif p.suffix == ".safetensors":
            h.update(_safetensors_header(p))
        else:
            h.update(str(p.stat().st_size).encode())


def _safetensors_header(path: Path) -> bytes:
    """A safetensors file's JSON header (tensor names, shapes, offsets and the metadata: the architecture a
    bundled teacher records, a student's teacher fingerprint): what plans depend on, read without the data.
    A file too short or malformed for one counts by its size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, 100 << 20):
            return str(size).encode()
        return head + f.read(n)


@cache
def code_version() -> str:
    """A digest of the code a plan's figures come from (see the module docstring)."""
    h = hashlib.sha256()
    for pkg in SOURCE_PACKAGES:
        try:
            root = Path(str(resources.files(pkg)))
        except (ModuleNotFoundError, TypeError):
            continue
        h.update(pkg.encode())
        _hash_files(h, root)
    for dist in VERSIONED:
        try:
            h.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist}=-".encode())
    for group in ("ndopt.passes", "ndopt.targets", "ndopt.frontends"):
        for ep in sorted(metadata.entry_points(group=group), key=lambda e: (e.name, e.value)):
            dist = getattr(ep, "dist", None)
            h.update(f"{group}:{ep.name}={ep.value}@{dist.version if dist else '-'}".encode())
    return h.hexdigest()[:32]


def recipe_text(ref: str) -> str:
    """A recipe's text (a path or a shipped recipe's name); a placeholder when it cannot be read (the
    plan itself then reports why)."""
    from ndopt.errors import RecipeError
    from ndopt.recipe_paths import resolve_recipe_path

    try:
        return resolve_recipe_path(ref).read_bytes().decode("utf-8", "replace")
    except (RecipeError, OSError):
        return f"<unresolved {ref}>"


def _model_identity(ref: str | None) -> str:
    """A preset or bundled name as it is; a directory by its files (configs by content, weights by size)."""
    if ref is None:
        return "-"
    path = Path(ref)
    if not path.is_dir():
        return ref
    h = hashlib.sha256(str(path.resolve()).encode())
    _hash_files(h, path, skip_dirs=("__pycache__",))
    return h.hexdigest()


def _target_identity(ref: str | None) -> str:
    return recipe_text(ref) if ref and Path(ref).is_file() else (ref or "-")


def plan_key(args: dict[str, Any]) -> str:
    """The key of a plan with these CLI arguments (recipe, model, target, sizes, first frame)."""
    ident = dict(args)
    ident["recipe_text"] = recipe_text(args["recipe"]) if args.get("recipe") else None
    ident["model_identity"] = _model_identity(args.get("model"))
    ident["target_identity"] = _target_identity(args.get("target"))
    if ident["recipe_text"]:  # a checkpoint directory or target file the recipe names counts by its content
        import yaml

        try:
            data = yaml.safe_load(ident["recipe_text"])
        except yaml.YAMLError:
            data = None
        if isinstance(data, dict):
            refs = [data.get("target"), *(data.get("targets") or [])]
            ident["recipe_model_identity"] = _model_identity(str(data["model"])) if data.get("model") else None
            ident["recipe_target_identity"] = [_target_identity(str(t)) for t in refs if isinstance(t, str)]
    ident.pop("out_dir", None)  # where the report goes does not change it
    ident["code"] = code_version()
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:40]


def _entry(kind: str, key: str) -> Path:
    return cache_dir() / kind / key


def load_plan(key: str, report_dir: Path | None) -> dict[str, Any] | None:
    """A cached plan, its report files copied into `report_dir` (the paths in it rewritten); None on a miss."""
    if not enabled():
        return None
    entry = _entry("plans", key)
    try:
        result = json.loads((entry / RESULT).read_text())
        files = result.pop("_files", {})
        if files:
            if report_dir is None:
                return None
            report_dir.mkdir(parents=True, exist_ok=True)
            for name in files.values():
                src = entry / name
                with tempfile.NamedTemporaryFile(dir=report_dir, prefix=f".{name}.", delete=False) as tmp:
                    shutil.copyfileobj(src.open("rb"), tmp)
                os.replace(tmp.name, report_dir / name)
            result["paths"] = {k: str(report_dir / name) for k, name in files.items()}
        return result
    except (OSError, ValueError):
        return None


def store_plan(key: str, result: dict[str, Any]) -> None:
    """Keep a plan (and the report files it names) for the next identical `ndopt plan`; best effort."""
    if not enabled():
        return
    entry = _entry("plans", key)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{key}."))
        files = {}
        for k, p in (result.get("paths") or {}).items():
            shutil.copyfile(p, tmp / Path(p).name)
            files[k] = Path(p).name
        body = {k: v for k, v in result.items() if k != "paths"}
        body["_files"] = files
        (tmp / RESULT).write_text(json.dumps(body, default=str))
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
    except OSError:
        pass


def load_json(kind: str, key: str) -> Any:
    if not enabled():
        return None
    try:
        return json.loads(_entry(kind, key + ".json").read_text())
    except (OSError, ValueError):
        return None


def store_json(kind: str, key: str, value: Any) -> None:
    if not enabled():
        return
    path = _entry(kind, key + ".json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
            tmp.write(json.dumps(value))
        os.replace(tmp.name, path)
    except OSError:
        pass
