"""Read and write the upstream Pyramid-Flow checkpoint layout, one component directory at a time.

The upstream model directory (HF ``rain1011/pyramid-flow-sd3``) holds one sub-directory per
component: ``diffusion_transformer_768p/``, ``diffusion_transformer_384p/`` and
``causal_video_vae/`` in diffusers layout (``config.json`` + ``diffusion_pytorch_model``
safetensors, single or sharded with a ``.safetensors.index.json``), ``text_encoder{,_2,_3}/`` in
transformers layout (``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` + index), and
the tokenizers. This module finds and loads a component's weights (every floating tensor must be
finite), checks them against a module before loading (names, shapes and dtype kinds, so a wrong
variant or a float weight stored as integers fails with the keys named, not deep inside torch), and
writes a component back in the same layout.

Pickled ``.bin``/``.pt`` weights are read only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ndopt.errors import CheckpointError
from ndopt.io import atomic_dir, atomic_write_json
from ndopt.saved_weights import check_finite, dtype_mismatches

__all__ = [
    "CONFIG_NAME",
    "FLUX_DIT_CLASS",
    "WEIGHT_NAMES",
    "dit_class_name",
    "find_weight_files",
    "load_into",
    "load_state_dict",
    "read_config",
    "read_json_object",
    "save_component",
]

logger = logging.getLogger("ndopt")

CONFIG_NAME = "config.json"

# Searched in this order; the first one present wins. safetensors before pickles, a single file
# before its index (as transformers does), diffusers names before transformers names.
WEIGHT_NAMES: tuple[str, ...] = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "diffusion_pytorch_model.pt",
    "model.pt",
)

# The names save_component writes (diffusers naming).
_SAVE_NAME = "diffusion_pytorch_model.safetensors"
_SAVE_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_SAVE_SHARD = "diffusion_pytorch_model-{index:05d}-of-{count:05d}.safetensors"

_LIST_LIMIT = 20  # keys listed per kind in an error message


# --------------------------------------------------------------------------- reading files


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: {what} not found; is {path.parent} a Pyramid-Flow component directory "
            "(e.g. <model>/diffusion_transformer_768p)?"
        ) from None
    except UnicodeDecodeError as e:
        raise CheckpointError(
            f"{path}: {what} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
            "fix the file or download it again"
        ) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what}: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path}:{e.lineno}:{e.colno}: malformed JSON in {what}: {e.msg}; "
            "fix the file or download it again"
        ) from e
    except RecursionError:
        raise CheckpointError(f"{path}: {what} nests too deeply to be a config; fix the file or download it "
                              "again") from None


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object from a UTF-8 file; CheckpointError naming the file if missing, not UTF-8, malformed
    or not an object."""
    path = Path(path)
    data = _read_json(path, what)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object, found {type(data).__name__}")
    return data


def read_config(component_dir: Path) -> dict:
    """The component's ``config.json`` as a dict; CheckpointError if missing or malformed."""
    return read_json_object(Path(component_dir) / CONFIG_NAME, "config")


FLUX_DIT_CLASS = "PyramidFluxTransformer"  # upstream's miniFLUX DiT (SD3's: PyramidDiffusionMMDiT)


def dit_class_name(checkpoint: Path, variant: str) -> str | None:
    """The DiT class a checkpoint directory's ``diffusion_transformer_<variant>/config.json`` names (else
    the first variant's present), which tells the model family apart (SD3 or miniFLUX); a config without
    ``_class_name`` is named by its keys (``num_single_layers``: miniFLUX's). None when there is no readable
    config: the family's loader then says what is wrong."""
    checkpoint = Path(checkpoint)
    for d in (checkpoint / f"diffusion_transformer_{variant}", *sorted(checkpoint.glob("diffusion_transformer_*"))):
        path = d / CONFIG_NAME
        if path.is_file():
            try:
                cfg = json.loads(path.read_text())
            except (OSError, ValueError):
                return None
            if not isinstance(cfg, dict):
                return None
            name = cfg.get("_class_name")
            if isinstance(name, str):
                return name
            return FLUX_DIT_CLASS if "num_single_layers" in cfg else None
    return None


def _read_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a sharded checkpoint's index."""
    index = _read_json(path, "shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{path}: malformed shard index: expected an object with a non-empty 'weight_map' "
            "of tensor name -> shard file; download the index again"
        )
    for key, shard in weight_map.items():
        # Shards must be plain names in the component directory, never paths elsewhere.
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(
                f"{path}: malformed shard index: weight_map[{key!r}] = {shard!r} is not a file "
                "name in this directory"
            )
    return weight_map


def _locate(component_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of a component, and the index's weight_map when it is sharded."""
    component_dir = Path(component_dir)
    if not component_dir.is_dir():
        raise CheckpointError(f"{component_dir}: component directory does not exist")
    for name in WEIGHT_NAMES:
        path = component_dir / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path], None
        weight_map = _read_index(path)
        shards = [component_dir / s for s in sorted(set(weight_map.values()))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(
                f"{path}: {len(missing)} of {len(shards)} shard file(s) listed in the index are "
                f"missing: {_listing(missing)}; the download is incomplete, fetch them again"
            )
        return shards, weight_map
    present = sorted(p.name for p in component_dir.iterdir())
    raise CheckpointError(
        f"{component_dir}: no weight file found; looked for {', '.join(WEIGHT_NAMES)}; "
        f"the directory holds: {_listing(present) or 'nothing'}"
    )


def find_weight_files(component_dir: Path) -> list[Path]:
    """The component's weight file, or all shards its index lists (sorted, each once)."""
    return _locate(component_dir)[0]


def _convert(key: str, t: Tensor, path: Path, dtype: torch.dtype | None, device: str | torch.device) -> Tensor:
    """A tensor as read, checked finite, converted to `dtype` (floating ones), checked again if that narrowed it."""
    check_finite(key, t, path)
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        stored, t = t.dtype, t.to(dtype)
        if torch.finfo(dtype).max < torch.finfo(stored).max:  # e.g. float32 -> float16 may overflow to inf
            check_finite(key, t, path, stored=stored)
    return t.to(device)


def _read_safetensors(path: Path, dtype: torch.dtype | None, device: str | torch.device) -> dict[str, Tensor]:
    try:
        # Tensor by tensor, converting each before reading the next, so fp32 -> bf16 never
        # holds the whole file in fp32.
        with safe_open(path, framework="pt", device="cpu") as f:
            names = f.keys()  # a safe_open handle is not iterable itself
            return {k: _convert(k, f.get_tensor(k), path, dtype, device) for k in names}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({e}); it is truncated or corrupt, download it again"
        ) from e


def _read_pickle(path: Path, dtype: torch.dtype | None, device: str | torch.device) -> dict[str, Tensor]:
    try:
        # weights_only=True: a pickle may run arbitrary code; only tensors and containers load.
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: the pickle holds objects other than tensors and containers "
            f"({str(e).splitlines()[-1] if str(e) else e!r}); convert it to safetensors from a "
            "trusted environment"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(
            f"{path}: cannot read the torch checkpoint ({str(e).splitlines()[0]}); it is "
            "truncated or corrupt, download it again"
        ) from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:
        raise CheckpointError(
            f"{path}: not a flat state dict: {len(bad)} entries are not name -> tensor "
            f"({_listing(bad)}); if it wraps one (e.g. under 'model' or 'state_dict'), save that "
            "inner dict instead"
        )
    return {k: _convert(k, v, path, dtype, device) for k, v in obj.items()}


def load_state_dict(
    component_dir: Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Tensor]:
    """All tensors of a component, shards merged; floating tensors converted to ``dtype``.

    Integer and bool tensors keep their dtype. Every floating tensor must be finite, as stored and
    after the conversion (CheckpointError naming the first that is not, its file and NaN/inf count).
    Every tensor named in a shard index must be in the shards, and no tensor may appear in two files.
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    files, weight_map = _locate(component_dir)
    state: dict[str, Tensor] = {}
    origin: dict[str, Path] = {}
    for path in files:
        read = _read_safetensors if path.suffix == ".safetensors" else _read_pickle
        part = read(path, dtype, device)
        dup = [k for k in part if k in state]
        if dup:
            raise CheckpointError(
                f"{path}: {len(dup)} tensor(s) also in {origin[dup[0]].name}: {_listing(dup)}; "
                "the shards come from different checkpoints"
            )
        state.update(part)
        origin.update(dict.fromkeys(part, path))
        logger.debug("loaded %d tensors from %s", len(part), path)
    if weight_map is not None:
        absent = [k for k in weight_map if k not in state]
        if absent:
            raise CheckpointError(
                f"{Path(component_dir)}: the shard index lists {len(absent)} tensor(s) that no "
                f"shard holds: {_listing(absent)}; the shards do not match the index, download "
                "them again"
            )
    return state


# --------------------------------------------------------------------------- loading a module


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    more = len(items) - _LIST_LIMIT
    return f"{shown}, ... ({more} more)" if more > 0 else shown


def _count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def _tied_groups(expected: dict[str, Tensor]) -> list[list[str]]:
    """Groups of state-dict names that are one tensor in the module (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name, t in expected.items():
        by_id.setdefault(id(t), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _get_tensor(module: nn.Module, name: str) -> Tensor:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    return owner._parameters[attr] if attr in owner._parameters else owner._buffers[attr]


def _set_tensor(module: nn.Module, name: str, value: Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if attr in owner._parameters:
        owner._parameters[attr] = value  # type: ignore[assignment]
    else:
        owner._buffers[attr] = value


def load_into(
    module: nn.Module,
    state_dict: dict[str, Tensor],
    *,
    source: str,
    strict: bool = True,
    assign: bool = False,
) -> None:
    """Load ``state_dict`` into ``module`` after checking names, shapes and dtype kinds.

    Raises CheckpointError naming ``source`` and listing (count, first 20) the missing,
    unexpected, shape-mismatched and dtype-mismatched keys: a floating parameter given an integer,
    bool or complex tensor (or the reverse) is refused, while float16, bfloat16, float32 and float64
    are interchangeable (torch converts them). Non-persistent buffers are not expected. A name the
    module ties to another (e.g. T5's ``encoder.embed_tokens.weight`` and ``shared.weight``) is
    not missing when its partner is present, as transformers saves only one of them. With
    ``strict=False`` missing and unexpected keys are logged instead; shape mismatches always
    raise, and so do dtype mismatches. ``assign=True`` takes the checkpoint's tensors as they are
    (for modules built on the meta device) and re-ties tied names.
    """
    expected = module.state_dict(keep_vars=True)  # persistent parameters and buffers only
    groups = _tied_groups(expected)
    covered = {n for g in groups if any(k in state_dict for k in g) for n in g}
    missing = [k for k in expected if k not in state_dict and k not in covered]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    dtypes = dtype_mismatches(expected, state_dict)
    for g in groups:
        present = [k for k in g if k in state_dict]
        first = state_dict[present[0]] if present else None
        mismatched += [
            f"{k}: tied to {present[0]} in the model but different in the checkpoint"
            for k in present[1:]
            if state_dict[k].shape == first.shape and not torch.equal(state_dict[k], first)
        ]

    if not assign:
        meta = [k for k in expected if expected[k].is_meta and k in state_dict]
        if meta:
            raise ValueError(
                f"loading {source}: {_count(len(meta), 'tensor')} of the module are on the meta "
                f"device ({_listing(meta)}); copying into them would drop the values, pass "
                "assign=True"
            )

    problems = []
    if missing:
        problems.append(f"{_count(len(missing), 'missing key')} ({_listing(missing)})")
    if unexpected:
        problems.append(f"{_count(len(unexpected), 'unexpected key')} ({_listing(unexpected)})")
    if mismatched:
        problems.append(
            f"{_count(len(mismatched), 'shape mismatch', 'shape mismatches')} ({_listing(mismatched)})"
        )
    if dtypes:
        problems.append(f"{_count(len(dtypes), 'dtype mismatch', 'dtype mismatches')} ({_listing(dtypes)})")
    what = f"checkpoint {source} does not fit {type(module).__name__}: " + "; ".join(problems)
    advice = (
        "is the model built from this checkpoint's config.json (wrong variant such as 384p vs "
        "768p, or a different depth or width)?"
    )
    if dtypes:
        advice = (advice + " " if missing or unexpected or mismatched else "") + (
            "a float weight stored as integers or bools is a bad export or a corrupt file, not this "
            "model's weights: export it again as float16, bfloat16 or float32.")
    if mismatched or dtypes or (strict and (missing or unexpected)):
        if not (mismatched or dtypes):
            advice += " Pass strict=False to load anyway, leaving missing tensors as they are."
        raise CheckpointError(f"{what}. Check: {advice}")
    if missing or unexpected:
        logger.warning("%s (loading with strict=False)", what)

    # Our own check above already accounted for tied names, so torch's strict check (which
    # does not know about ties) is not needed.
    module.load_state_dict(state_dict, strict=False, assign=assign)
    if assign:
        # assign replaced each name's tensor separately, so ties in the module are broken.
        for g in groups:
            present = [k for k in g if k in state_dict]
            if present:
                canonical = _get_tensor(module, present[0])
                for k in g:
                    if k != present[0]:
                        _set_tensor(module, k, canonical)
    logger.debug("loaded %d tensors from %s into %s", len(state_dict), source, type(module).__name__)


# --------------------------------------------------------------------------- writing


def _tensors_for_save(module: nn.Module) -> dict[str, Tensor]:
    """The module's state dict made acceptable to safetensors' save_file.

    save_file refuses tensors that share storage (tied weights) and non-contiguous ones; those
    are cloned contiguous, the rest saved as they are (no copy of the whole model).
    """
    state = {k: t.detach() for k, t in module.state_dict().items()}
    meta = [k for k, t in state.items() if t.is_meta]
    if meta:
        raise ValueError(
            f"cannot save {type(module).__name__}: {_count(len(meta), 'tensor')} on the meta "
            f"device ({_listing(meta)}); load or initialize the weights first"
        )
    users: dict[tuple[str, int], int] = {}
    for t in state.values():
        key = (str(t.device), t.untyped_storage().data_ptr())
        users[key] = users.get(key, 0) + 1
    out = {}
    for k, t in state.items():
        shared = users[(str(t.device), t.untyped_storage().data_ptr())] > 1
        if shared or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        out[k] = t
    return out


def _plan_shards(tensors: dict[str, Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split in state-dict order; a tensor larger than the limit gets a shard alone."""
    shards: list[list[str]] = [[]]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    return shards


def save_component(
    component_dir: Path,
    module: nn.Module,
    config: dict,
    *,
    max_shard_bytes: int | None = None,
) -> None:
    """Write ``config.json`` and the module's weights as one upstream component directory.

    One ``diffusion_pytorch_model.safetensors``, or, when the weights exceed
    ``max_shard_bytes``, ``diffusion_pytorch_model-0000k-of-0000n.safetensors`` shards and a
    ``diffusion_pytorch_model.safetensors.index.json`` (diffusers naming). The directory is
    replaced as a whole and atomically (ndopt.io.atomic_dir): a failure leaves the previous one.
    """
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    tensors = _tensors_for_save(module)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    metadata = {"format": "pt"}  # transformers checks this field when loading
    with atomic_dir(Path(component_dir)) as tmp:
        atomic_write_json(tmp / CONFIG_NAME, config)
        if max_shard_bytes is None or total <= max_shard_bytes:
            save_file(tensors, tmp / _SAVE_NAME, metadata=metadata)
            logger.debug("saved %d tensors to %s", len(tensors), component_dir)
            return
        plan = _plan_shards(tensors, max_shard_bytes)
        weight_map = {}
        for i, names in enumerate(plan, start=1):
            name = _SAVE_SHARD.format(index=i, count=len(plan))
            save_file({k: tensors[k] for k in names}, tmp / name, metadata=metadata)
            weight_map.update(dict.fromkeys(names, name))
        atomic_write_json(tmp / _SAVE_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        logger.debug("saved %d tensors to %s in %d shards", len(tensors), component_dir, len(plan))
