"""The model interface: what passes, targets, training and the runner may ask of a model, and the
registry of the frontends that implement it.

A frontend (a model family's package under `ndopt/frontends/`, or another distribution) registers
one `ModelInterface` under its name in the `ndopt.frontends` entry-point group, as targets register
in `ndopt.targets` (a broken plugin is logged and skipped, the others stay usable). Nothing outside
the frontends imports a frontend: a pass asks `interface_for(pipeline)`, the interface of the
frontend that built the pipeline (`Pipeline.frontend`), for "the denoiser's blocks" or "a copy
without these blocks" (Olive's ModelWrapper, STYLE.md), so a second model needs no pass changes.

Capabilities are the interface's methods. A frontend overrides the ones its models support; the
others raise a PassError naming the capability, and `require` lets a pass refuse before any work.
The pyramidal-flow family's schedule math (shared by its frontends) is one `SamplerMath` record.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from ndopt.errors import CheckpointError, NdoptError, PassError

if TYPE_CHECKING:  # torch-light at import: the CLI lists presets through this module
    import torch
    from torch import Tensor, nn

    from ndopt.ir.pipeline import Pipeline

log = logging.getLogger("ndopt")

ENTRY_POINT_GROUP = "ndopt.frontends"
DEFAULT_FRONTEND = "pyramid-flow"  # what a Pipeline (or a saved pipeline) that names none was built by
HYBRID = "image-model"  # Schedule.first_frame of Neodragon's hybrid mode (`--first-frame image-model`)


# ---- records a frontend returns -------------------------------------------------------------------
class Block(NamedTuple):
    """One transformer block of a denoiser: its position among all blocks (execution order), its kind
    ("joint" for SD3's MMDiT, "double" / "single" for FLUX) and its module path (the fx node target)."""

    index: int
    kind: str
    name: str


@dataclass(frozen=True)
class BlockIO:
    """How a block kind is called: `inputs` names its leading positional arguments, `outputs` the tuple
    it returns (one name: it returns the tensor itself). A stream named in both passes through a removed
    block unchanged; `image` is the image-token stream that block importance compares."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    image: str = "hidden_states"


@dataclass(frozen=True)
class TextConditioning:
    """What an encoder substitution distils: the long-sequence encoder (T5: `(input_ids, attention_mask)`
    -> `.last_hidden_state`), its tokenizer (None on a meta pipeline without tokenizers) and padded
    length, its config (a T5Config dict), the frozen pooled-text path (captions -> pooled projections)
    and the DiT's `context_embedder` it feeds."""

    encoder: nn.Module
    tokenizer: Any
    max_length: int
    config: Mapping[str, Any]
    pooled: Callable[[list[str]], Tensor]
    context_embedder: nn.Module


@dataclass(frozen=True)
class TextStudent:
    """The student parts of an encoder substitution: the distilled encoder, the context adapter that
    takes over `context_embedder`, their config (`variant`, `context_dim`: the new context width), and
    `lora(rank)`, low-rank adapters on the student encoder (`merge()` folds them in)."""

    encoder: nn.Module
    adapter: nn.Module
    config: Any
    lora: Callable[[int], Any]


@dataclass(frozen=True)
class SamplerMath:
    """The pyramidal-flow family's schedule math, shared by its frontends: what passes, training
    objectives and the bundle program compute the sampler's loop with (upstream's conventions)."""

    is_sampler: Callable[[Any], bool]  # this family's sampler (the bundle writes its loop out)
    stage_hw: Callable[..., tuple[int, int]]  # (schedule, stage) -> latent (h, w) of a pyramid stage
    history_clips: Callable[..., list[tuple[int, int, int]]]  # (unit, stage, n_stages, fpu) -> (first, frames, stage)
    stage_timesteps: Callable[..., list[float]]  # (stage, n) -> the DiT's timesteps of its n steps
    stage_local_sigmas: Callable[[int], list[float]]  # n -> local Euler sigmas within a stage (n + 1)
    unroll: Callable[[Pipeline], list[dict[str, Any]]]  # every DiT call of one video with its constants
    FOLDED: str  # the analyses key of a folded schedule
    FoldedSchedule: type  # (stages, timesteps, table, rows): a folded schedule's constants
    folded_time: Callable[[Any], bool]  # the DiT component takes the folded timestep embedding
    folded_schedule: Callable[[Pipeline], Any]  # the pipeline's FoldedSchedule, checked current
    block_noise_cholesky: Callable[[float], Tensor]  # the renoise's 2x2-block covariance factor
    frame_count: Callable[[int], int]  # video frames of n latent frames
    spatial_factor: int  # the VAE's spatial downsampling
    image_scale: float  # latent normalisation of the first frame: (z - shift) * scale
    image_shift: float
    video_scale: float  # ... and of the later frames
    video_shift: float
    normalize_latents: Callable[[Tensor], Tensor]
    denormalize_latents: Callable[[Tensor], Tensor]


# ---- the interface --------------------------------------------------------------------------------
CAPABILITIES = {
    "blocks": "the denoiser's transformer blocks and their kinds",
    "without_blocks": "a copy of the denoiser without some of its blocks",
    "trace": "the denoiser's block-level torch.fx trace for one call",
    "fold_timestep_embedding": "the denoiser's timestep MLP precomputed for a fixed schedule",
    "set_attention": "switching the denoiser's attention implementation",
    "text_conditioning": "the text encoder's sequence encoder, tokenizer and pooled path",
    "text_student": "a distilled text encoder and context adapter",
    "build_decoder": "alternative VAE decoders",
    "save_student": "writing step-distilled student denoisers",
    "load_student": "reading step-distilled student denoisers",
    "hybrid": "Neodragon's hybrid mode (an image model's first frame, super-resolution)",
    "build_from_configs": "rebuilding a saved pipeline's base from a checkpoint's configs",
    "untrained": "a preset's modules freshly initialised (training a teacher)",
    "save_weights": "writing a pipeline's weights as a preset's bundled weights",
    "sampler": "the pyramidal sampler's schedule math",
}


class ModelInterface:
    """What a frontend offers (see the module docstring). `name`, `preset_names` and `load` are required;
    every method in `CAPABILITIES` is optional: the base raises a PassError naming it."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    sampler: SamplerMath | None = None  # the pyramidal family's schedule math (None: another sampler)
    image_components: tuple[str, ...] = ()  # the hybrid mode's image-model components, in call order

    # ---- capabilities ----------------------------------------------------------------------------
    def supports(self, capability: str) -> bool:
        if capability not in CAPABILITIES:
            raise ValueError(f"unknown capability {capability!r}; known: {', '.join(CAPABILITIES)}")
        if capability == "sampler":
            return self.sampler is not None
        return getattr(type(self), capability) is not getattr(ModelInterface, capability)

    def require(self, *capabilities: str, user: str) -> ModelInterface:
        """Self, or a PassError naming the first capability this frontend lacks and who needed it."""
        for cap in capabilities:
            if not self.supports(cap):
                raise PassError(f"{user}: the model frontend {self.name!r} does not offer {cap!r} "
                                f"({CAPABILITIES[cap]}), so {user} cannot run on its models")
        return self

    def _missing(self, capability: str) -> PassError:
        return PassError(f"the model frontend {self.name!r} does not offer {capability!r} ({CAPABILITIES[capability]})")

    # ---- models (required) -------------------------------------------------------------------------
    def preset_names(self) -> list[str]:
        """The names `load` builds (presets, bundled students)."""
        raise NotImplementedError

    def load(self, ref: str, *, device: torch.device | str = "cpu", seed: int = 0, meta: bool = False,
             variant: str = "768p") -> Pipeline | None:
        """A preset or a checkpoint directory of this frontend's; None when `ref` is not one of its own."""
        raise NotImplementedError

    # ---- the denoiser ------------------------------------------------------------------------------
    def blocks(self, dit: nn.Module) -> list[Block]:
        """The denoiser's transformer blocks in execution order (a PassError for a module it cannot read)."""
        raise self._missing("blocks")

    def block_io(self, kind: str) -> BlockIO:
        """How blocks of `kind` are called (what a graph rewrite and importance hooks read)."""
        raise self._missing("blocks")

    def without_blocks(self, dit: nn.Module, keep: list[int], *, fold_last_context: bool = True) -> nn.Module:
        """A new denoiser with the blocks `keep` (indices of `blocks`), renumbered, weights copied; the
        input is untouched. `fold_last_context`: fold dead outputs of the new last block away (exact)."""
        raise self._missing("without_blocks")

    def trace(self, dit: nn.Module, layout: Any) -> torch.fx.GraphModule:
        """The denoiser bound to one call's layout, traced by torch.fx with its blocks as leaf modules."""
        raise self._missing("trace")

    def block_names(self, gm: torch.fx.GraphModule) -> list[str]:
        """The block nodes' targets of a `trace`, in execution order."""
        raise self._missing("trace")

    def dit_layout(self, pipeline: Pipeline) -> Any:
        """The layout of the sampler's first DiT call (what `trace` binds)."""
        for sig in pipeline.call_plan():
            if pipeline[sig.component].role == "dit":
                return sig.static_dict["layout"]
        raise PassError(f"pipeline {pipeline.name!r}: its sampler never calls the DiT")

    def fold_timestep_embedding(self, dit: nn.Module, timesteps: list[float]) -> tuple[nn.Module, Tensor]:
        """(a denoiser taking `timestep_embedding`, the [len(timesteps), D] table of its timestep MLP)."""
        raise self._missing("fold_timestep_embedding")

    def set_attention(self, dit: nn.Module, impl: str) -> nn.Module:
        """Switch the denoiser's attention in place: 'sdpa' or 'matmul' (explicit, quantizable ops)."""
        raise self._missing("set_attention")

    # ---- text conditioning -------------------------------------------------------------------------
    def text_conditioning(self, text_encoder: nn.Module, dit: nn.Module) -> TextConditioning:
        """The teacher side of an encoder substitution (a PassError if the encoder has no such path)."""
        raise self._missing("text_conditioning")

    def distilled_text_variant(self, text_encoder: nn.Module) -> str | None:
        """The variant of an already substituted text encoder; None for an original one."""
        return None

    def text_student(self, text_encoder: nn.Module, dit: nn.Module, variant: str,
                     overrides: Mapping[str, Any]) -> TextStudent:
        """Fresh student parts (on the current default device and RNG) for `variant`."""
        raise self._missing("text_student")

    def substituted_text_encoder(self, text_encoder: nn.Module, student: TextStudent) -> nn.Module:
        """The text encoder with its sequence encoder replaced by the student's (same call interface)."""
        raise self._missing("text_student")

    def without_context_embedder(self, dit: nn.Module) -> nn.Module:
        """A shallow copy of the denoiser whose context embedder is the identity (the adapter took it)."""
        raise self._missing("text_student")

    # ---- decoders, quantization, weights -----------------------------------------------------------
    def build_decoder(self, kind: str, scale: str, latent_channels: int) -> nn.Module:
        """A fresh video decoder of `kind` at `real` or `tiny` scale (current default device)."""
        raise self._missing("build_decoder")

    def eager_modules(self) -> tuple[type, ...]:
        """Module types that keep state in Python attributes (streaming caches): never traced."""
        return ()

    def bundled_weights(self, name: str) -> Path | None:
        """The file of weights this frontend ships under `name`, if any."""
        return None

    def weights_file(self, ref: str | Path) -> Path:
        """A weights file: a path, or the bare name of one this frontend bundles (a shipped recipe reuses
        a shipped artifact); an unknown name stays a path (its loader says it does not exist)."""
        path = Path(ref)
        if path.is_file() or path.suffix or len(path.parts) > 1:
            return path
        return self.bundled_weights(str(ref)) or path

    def load_into(self, module: nn.Module, state_dict: Mapping[str, Tensor], *, source: str) -> None:
        """Load a state dict strictly into `module`, naming `source` in any error."""
        missing, unexpected = module.load_state_dict(dict(state_dict), strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{source}: missing keys {missing[:20]}, unexpected keys {unexpected[:20]}")

    def save_student(self, path: Path, student: nn.Module, teacher: nn.Module, target: Any,
                     config: Mapping[str, Any]) -> Path:
        """Write a step-distilled student with what it was distilled from (the teacher's fingerprint) and
        for (the target schedule's steps)."""
        raise self._missing("save_student")

    def load_student(self, path: Path, teacher: nn.Module, target: Any) -> nn.Module:
        """A student `save_student` wrote, for this teacher and these steps (refused otherwise)."""
        raise self._missing("load_student")

    # ---- saved pipelines ---------------------------------------------------------------------------
    def base_reference(self, pipeline: Pipeline, base: str | Path | None = None) -> dict[str, Any]:
        """What a saved pipeline's base is (`ndopt.saved`): by default one of this frontend's presets."""
        ref = str(base) if base is not None else pipeline.name
        if ref in self.preset_names():
            return {"kind": "preset", "name": ref}
        raise CheckpointError(f"save_pipeline: cannot tell the base model of pipeline {pipeline.name!r} (not a "
                              f"preset of {self.name!r}); pass base=<preset name>")

    def copy_base_configs(self, source: Path, dest: Path) -> None:
        """Copy a checkpoint base's configs (no weights) into a saved pipeline."""
        raise self._missing("build_from_configs")

    def build_from_configs(self, base: Path, variants: list[str], name: str | None = None) -> Pipeline:
        """A checkpoint's pipeline on the meta device from its configs (weights come from elsewhere)."""
        raise self._missing("build_from_configs")

    def write_upstream(self, pipeline: Pipeline, directory: Path) -> dict[str, Any]:
        """Write the denoiser in its upstream layout where it still has it; the record says where or why not."""
        return {"written": False, "reason": f"the model frontend {self.name!r} has no upstream layout"}

    # ---- hybrid mode and training ------------------------------------------------------------------
    def hybrid(self, pipeline: Pipeline, **kwargs: Any) -> Pipeline:
        """The pipeline in Neodragon's hybrid mode (`HYBRID`)."""
        raise self._missing("hybrid")

    def hybrid_base(self, pipeline: Pipeline) -> str:
        """The name of a hybrid pipeline's base (before the hybrid components joined it)."""
        return pipeline.name

    def untrained(self, preset: str, seed: int, architecture: Mapping[str, Mapping[str, Any]] | None = None) -> Pipeline:
        """The preset's modules with the upstream initialisation (never bundled weights); `architecture`
        overrides fields of its component configs ({"vae": {...}, "dit": {...}}: a wider teacher)."""
        raise self._missing("untrained")

    def save_weights(self, pipeline: Pipeline, path: Path | None = None) -> Path:
        """Write the pipeline's weights in the bundled-weights format to `path` (None: install them as the
        bundled weights of the preset `pipeline.name`)."""
        raise self._missing("save_weights")


# ---- the registry ---------------------------------------------------------------------------------
@functools.cache
def _discover() -> tuple[dict[str, ModelInterface], dict[str, str]]:
    """(frontends by name, why each broken plugin failed); found once per process."""
    found: dict[str, ModelInterface] = {}
    broken: dict[str, str] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            iface = obj() if isinstance(obj, type) else obj
            if not isinstance(iface, ModelInterface):
                raise TypeError(f"{ep.value} is a {type(iface).__name__}, not an ndopt.model.ModelInterface")
            if iface.name != ep.name:
                raise TypeError(f"its interface is named {iface.name!r}, its entry point {ep.name!r}")
        except Exception as e:  # one broken plugin must not hide the others; say which one and why
            log.warning("model frontend %s (%s) failed to load: %s", ep.name, ep.value, e)
            broken[ep.name] = f"{type(e).__name__}: {e}"
            continue
        if ep.name in found:
            raise NdoptError(f"two model frontends are named {ep.name!r} (entry point {ep.value})")
        found[ep.name] = iface
    return dict(sorted(found.items())), broken


def frontends() -> dict[str, ModelInterface]:
    """The installed frontends by name (the `ndopt.frontends` entry points that loaded)."""
    return _discover()[0]


def frontend(name: str) -> ModelInterface:
    """An installed frontend by name, or an NdoptError saying why it is not there."""
    found, broken = _discover()
    if name in found:
        return found[name]
    if name in broken:
        raise NdoptError(f"the model frontend {name!r} failed to load ({broken[name]}); reinstall the package "
                         "that provides it")
    raise NdoptError(f"unknown model frontend {name!r}; installed: {', '.join(found) or '(none)'} (a frontend "
                     f"registers in the {ENTRY_POINT_GROUP!r} entry-point group)")


def interface_for(pipeline: Pipeline) -> ModelInterface:
    """The interface of the frontend that built `pipeline`."""
    return frontend(getattr(pipeline, "frontend", DEFAULT_FRONTEND))


def frontend_of(preset: str) -> ModelInterface:
    """The frontend that builds the preset `preset`."""
    for iface in frontends().values():
        if preset in iface.preset_names():
            return iface
    raise NdoptError(f"no installed model frontend builds {preset!r}; presets: {', '.join(preset_names())}")


def preset_names() -> list[str]:
    """Every installed frontend's presets (and bundled students)."""
    return sorted({n for iface in frontends().values() for n in iface.preset_names()})


def _load_order() -> list[ModelInterface]:
    """Frontends by name, the default one last: it claims whatever directory no other frontend does."""
    found = frontends()
    return [i for n, i in found.items() if n != DEFAULT_FRONTEND] + \
        ([found[DEFAULT_FRONTEND]] if DEFAULT_FRONTEND in found else [])


def load_model(ref: str, *, device: torch.device | str = "cpu", seed: int = 0, meta: bool = False,
               variant: str = "768p") -> Pipeline:
    """A pipeline saved by ndopt (`RUN/model`, a directory with `pipeline.json`), or what a frontend
    builds from `ref`: a preset name (on `device`, or on meta when `meta`), a bundled student, an upstream
    checkpoint directory. Real-size presets have no bundled weights: they are built on meta (plans)."""
    from ndopt.saved import is_saved_pipeline, load_saved

    if is_saved_pipeline(ref):
        if meta:
            raise NdoptError(f"{ref}: a saved pipeline holds weights; plan its recipe or its base model instead")
        return load_saved(ref, device=device)
    for iface in _load_order():
        pipeline = iface.load(ref, device=device, seed=seed, meta=meta, variant=variant)
        if pipeline is not None:
            return pipeline
    if Path(ref).exists():
        raise CheckpointError(f"{ref}: a model is a preset name, a saved pipeline (RUN/model) or an upstream "
                              "checkpoint directory, not a file")
    raise NdoptError(f"unknown model {ref!r}: not a preset ({', '.join(preset_names())}) and no such directory")


def hybrid_pipeline(pipeline: Pipeline, **kwargs: Any) -> Pipeline:
    """The pipeline in Neodragon's hybrid mode (its frontend's `hybrid`; keyword arguments go there)."""
    return interface_for(pipeline).require("hybrid", user="hybrid mode").hybrid(pipeline, **kwargs)


def sampler_math(pipeline: Pipeline | None = None) -> SamplerMath:
    """The pyramidal sampler's math of `pipeline`'s frontend; without a pipeline, the default frontend's
    (the math is the pyramidal-flow family's: training objectives read it from a Schedule alone)."""
    iface = interface_for(pipeline) if pipeline is not None else frontend(DEFAULT_FRONTEND)
    if iface.sampler is None:
        raise iface._missing("sampler")
    return iface.sampler


def video_frames(video: Tensor) -> list[Any]:
    """A decoded video (`Sampler.decode`: [B?, 3, F, H, W] in [-1, 1]) as HxWx3 uint8 numpy frames of
    its first video."""
    import torch

    v = video[0] if video.dim() == 5 else video
    v = ((v.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [v[:, f].permute(1, 2, 0).cpu().numpy() for f in range(v.shape[1])]


__all__ = ["CAPABILITIES", "DEFAULT_FRONTEND", "ENTRY_POINT_GROUP", "HYBRID", "Block", "BlockIO", "ModelInterface",
           "SamplerMath", "TextConditioning", "TextStudent", "frontend", "frontend_of", "frontends",
           "hybrid_pipeline", "interface_for", "load_model", "preset_names", "sampler_math", "video_frames"]
