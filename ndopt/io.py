"""Atomic writes: the one helper every ndopt writer goes through (STYLE rule 9).

Each helper writes to a temporary name in the destination's own directory (so the final
``os.replace`` is a same-filesystem rename), fsyncs it, then swaps it in. A writer that fails
leaves the previous file or directory exactly as it was and no temporary behind.

Temporary names start with ``.ndopt-tmp-`` and end with the destination's own name, so writers
that infer a format from the suffix (matplotlib ``savefig``, ``torch.onnx.export``) still see it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_dir",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
]

logger = logging.getLogger("ndopt")

TMP_PREFIX = ".ndopt-tmp-"
OLD_PREFIX = ".ndopt-old-"


def _sibling(path: Path, prefix: str) -> Path:
    """A fresh, unused name next to ``path`` that keeps ``path``'s name (and so its suffixes)."""
    return path.with_name(f"{prefix}{secrets.token_hex(6)}-{path.name}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; some filesystems/platforms refuse to open a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, os.replace)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def jsonable(x: Any) -> Any:
    """Plain JSON data: mappings to dicts with string keys, sequences to lists, inf/nan to strings."""
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        return str(x)
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def _json_default(obj: Any) -> Any:
    # numpy scalars, 0-d numpy arrays and 0-d torch tensors all have ndim == 0 and .item();
    # duck typing keeps numpy and torch out of this module's imports.
    if getattr(obj, "ndim", None) == 0 and hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(
        f"Object of type {type(obj).__name__} is not JSON serializable "
        "(only numpy/torch scalars and paths are converted; convert arrays with .tolist())"
    )


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON (indent 2, keys in insertion order, trailing newline) atomically.

    numpy/torch scalars become Python numbers. The object is serialized before anything is
    written, so an unserializable object leaves ``path`` untouched. NaN/inf are written as
    Python's json does (``NaN``, ``Infinity``), which ``json.loads`` reads back.
    """
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    atomic_write_text(path, text)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; on normal exit it replaces ``path``.

    For writers that need a file name (``torch.onnx.export``, ``savefig``, safetensors'
    ``save_file``). The temp path does not exist when yielded; the writer must create it.
    On an exception the temp is removed, ``path`` is untouched and the exception propagates.
    Parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, TMP_PREFIX)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(
                f"atomic_path: the writer did not create the file {tmp} meant for {path}; "
                f"{path} is left as it was"
            )
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``path``; on normal exit it becomes ``path``.

    An existing ``path`` is renamed to a backup, the new directory renamed into place, then the
    backup removed (restored if the second rename fails). The whole directory is replaced: files
    in the old one that the writer did not write again are gone. Between the two renames ``path``
    briefly does not exist; a crash in that window leaves the old contents in a
    ``.ndopt-old-*`` sibling. On an exception the temp directory is removed and ``path`` is
    untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, TMP_PREFIX)
    tmp.mkdir()
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                _fsync_file(Path(root) / name)
            _fsync_dir(Path(root))
        backup = None
        if path.exists() or path.is_symlink():
            backup = _sibling(path, OLD_PREFIX)
            os.replace(path, backup)
        try:
            os.replace(tmp, path)
        except BaseException:
            if backup is not None:
                os.replace(backup, path)
            raise
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(path.parent)
    if backup is not None:
        _remove(backup)
    logger.debug("atomic_dir: wrote %s", path)


def package_weights(package: str, name: str) -> Path:
    """Where `package` ships the weights file `name` (`<package>/weights/<name>`), present or not:
    what the bundled presets load and what a training script's `--install` writes."""
    from importlib import resources

    return Path(str(resources.files(package))) / "weights" / name


def shipped_weights(package: str, name: str) -> Path | None:
    """`package_weights` if the file is installed, else None."""
    path = package_weights(package, name)
    return path if path.is_file() else None
