"""Training data: a procedural captioned-video dataset, a folder dataset, and a latent cache.

`ProceduralVideos` draws coloured shapes moving in described directions on plain backgrounds,
with template captions ("a red circle moving left on a blue background") whose every word is a
whole-word entry of the tiny tokenizer (`assets/make_tiny_tokenizer.py`), so the tiny preset can
learn to follow them. Item `i` is a pure function of (seed, i): nothing is stored, and any process
or a resumed run sees the same clip for the same index.

`FolderVideos` reads real data: a directory with `captions.jsonl` lines `{"video": "a.mp4",
"caption": "..."}`. `LatentCache` encodes any video dataset once through the pipeline's VAE
encoder (normalised as the DiT sees latents) and keeps the latents on disk, keyed by the
encoder's weights, so a fine-tune does not re-run the encoder every step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr
from torch import Tensor, nn

from ndopt.errors import NdoptError

log = logging.getLogger("ndopt")

# Colour names of the tiny tokenizer's vocabulary with the RGB we draw them in ([0, 1]).
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10), "green": (0.10, 0.75, 0.15), "blue": (0.10, 0.20, 0.90),
    "yellow": (0.95, 0.90, 0.10), "orange": (1.00, 0.55, 0.05), "purple": (0.55, 0.15, 0.75),
    "white": (0.97, 0.97, 0.97), "black": (0.03, 0.03, 0.03), "pink": (1.00, 0.55, 0.75),
    "cyan": (0.10, 0.90, 0.90), "magenta": (0.90, 0.10, 0.85), "gray": (0.50, 0.50, 0.50),
    "brown": (0.50, 0.30, 0.10),
}
# Background words beyond the colours: "dark" and "light" plain backgrounds.
BACKGROUNDS: dict[str, tuple[float, float, float]] = {"dark": (0.08, 0.08, 0.10), "light": (0.88, 0.88, 0.85)}
SHAPES = ("circle", "square", "triangle", "ring", "star", "box")
DIRECTIONS: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0),
                                              "down": (0.0, 1.0), "still": (0.0, 0.0)}
SIZES: dict[str, tuple[float, float]] = {"small": (0.10, 0.13), "": (0.14, 0.19), "large": (0.20, 0.24)}


@dataclass(frozen=True)
class Example:
    """One training example: a caption and a video in [-1, 1] ([3, F, H, W]) or normalised latents."""

    caption: str
    video: Tensor | None = None
    latents: Tensor | None = None
    noise_seed: int | None = None  # the seed of the noise `latents` were sampled from (a teacher's sample)


@dataclass(frozen=True)
class Batch:
    """A batch: captions, stacked videos and/or latents, and each sample's position and seed.

    `indices` are positions in the run's sample stream (step * global batch + k), not dataset
    indices: they assign samples to pyramid stages. `seeds` make per-sample randomness (noise, timesteps, caption dropout) independent of how the
    global batch is split over processes and micro-batches (DDP equals one process)."""

    captions: list[str]
    videos: Tensor | None
    latents: Tensor | None
    indices: Tensor
    seeds: Tensor
    noise_seeds: Tensor | None = None  # the examples' own noise seeds, where every example has one

    def __len__(self) -> int:
        return len(self.captions)

    def generators(self) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(int(s)) for s in self.seeds]

    def to(self, device: torch.device) -> Batch:
        return Batch(self.captions, None if self.videos is None else self.videos.to(device),
                     None if self.latents is None else self.latents.to(device), self.indices, self.seeds,
                     self.noise_seeds)


class Dataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...


def collate(examples: Sequence[Example], indices: Sequence[int], seeds: Sequence[int]) -> Batch:
    def stack(name: str) -> Tensor | None:
        items = [getattr(e, name) for e in examples]
        if any(x is None for x in items):
            return None
        return torch.stack(items)

    noise = [e.noise_seed for e in examples]
    return Batch([e.caption for e in examples], stack("video"), stack("latents"),
                 torch.tensor(list(indices), dtype=torch.int64), torch.tensor(list(seeds), dtype=torch.int64),
                 None if any(n is None for n in noise) else torch.tensor(noise, dtype=torch.int64))


def sample_seed(seed: int, index: int, salt: str = "") -> int:
    """A 63-bit seed from (run seed, global index): stable across processes and Python runs."""
    h = hashlib.blake2b(f"{seed}:{index}:{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


# ---- procedural captioned videos ---------------------------------------------------------------
@dataclass(frozen=True)
class SceneSpec:
    colour: str
    shape: str
    direction: str
    background: str
    size: str = ""

    @property
    def caption(self) -> str:
        size = f"{self.size} " if self.size else ""
        motion = "" if self.direction == "still" else f" moving {self.direction}"
        return f"a {size}{self.colour} {self.shape}{motion} on a {self.background} background"


@dataclass(frozen=True)
class ProceduralConfig:
    """What the procedural dataset draws. Held-out (colour, shape) pairs never appear in training
    captions, so prompt following can be tested on unseen combinations."""

    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "orange", "purple", "white", "cyan", "pink")
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "ring")
    directions: tuple[str, ...] = ("left", "right", "up", "down", "still")
    # The defaults are the trained tiny teacher's distribution (ndopt/train/tiny_teacher.yaml), so the
    # passes fine-tune and distill on what it learned; the vocabularies hold more (colour backgrounds,
    # "small"; any palette colour as a background).
    backgrounds: tuple[str, ...] = ("dark", "light")
    sizes: tuple[str, ...] = ("", "large")
    held_out: tuple[tuple[str, str], ...] = (("red", "ring"), ("blue", "triangle"), ("yellow", "square"),
                                             ("green", "circle"), ("purple", "ring"), ("orange", "triangle"))
    frames: int = 9
    height: int = 64
    width: int = 64
    speed: tuple[float, float] = (1.4, 2.4)  # pixels per frame at 64 px, scaled with the width

    @classmethod
    def wide(cls) -> ProceduralConfig:
        """The wider caption vocabulary (colour backgrounds, "small"): for text-only corpora, where
        a distilled text encoder wants word variety more than the teacher's scenes (DT5 trained on the
        teacher's narrow captions over-fits them: measured on the first trained teacher, 16 dB vs
        28.6 dB latent PSNR on the probe)."""
        return cls(backgrounds=("dark", "light", "blue", "green", "gray", "brown"), sizes=("", "small", "large"))

    def fingerprint(self) -> str:
        """A short hash of every field (names caches of latents drawn from this distribution)."""
        import hashlib

        return hashlib.sha256(repr(self).encode()).hexdigest()[:10]

    def __post_init__(self) -> None:
        for name, vocab in (("colours", PALETTE), ("shapes", SHAPES), ("directions", DIRECTIONS),
                            ("sizes", SIZES)):
            bad = [x for x in getattr(self, name) if x not in vocab]
            if bad:
                raise NdoptError(f"ProceduralConfig.{name}: unknown {bad}; choose from {list(vocab)}")
        bad = [b for b in self.backgrounds if b not in PALETTE and b not in BACKGROUNDS]
        if bad:
            raise NdoptError(f"ProceduralConfig.backgrounds: unknown {bad}; colours or {list(BACKGROUNDS)}")
        if (self.frames - 1) % 8:
            raise NdoptError(f"ProceduralConfig.frames={self.frames}: the causal VAE needs 1 + 8k frames")


def colour_rgb(name: str) -> tuple[float, float, float]:
    return PALETTE.get(name) or BACKGROUNDS[name]


class ProceduralVideos:
    """Coloured shapes moving in described directions; item i is a function of (seed, i) only.

    `length` is nominal (the data is unbounded): an epoch of `length` distinct clips. With
    `held_out=True` the dataset draws only the held-out (colour, shape) pairs (for evaluation)."""

    def __init__(self, config: ProceduralConfig = ProceduralConfig(), *, seed: int = 0, length: int = 1 << 20,
                 held_out: bool = False) -> None:
        self.config, self.seed, self.length, self.held_out = config, seed, length, held_out
        held = set(config.held_out)
        pairs = [(c, s) for c in config.colours for s in config.shapes]
        self.pairs = [p for p in pairs if (p in held) == held_out]
        if not self.pairs:
            raise NdoptError("ProceduralConfig leaves no (colour, shape) pair to draw")

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> tuple[SceneSpec, torch.Generator]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, index, "procedural"))
        cfg = self.config

        def pick(seq: Sequence[Any]) -> Any:
            return seq[int(torch.randint(len(seq), (1,), generator=g))]

        colour, shape = pick(self.pairs)
        background = pick([b for b in cfg.backgrounds if b != colour])
        return SceneSpec(colour, shape, pick(cfg.directions), background, pick(cfg.sizes)), g

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < self.length:
            raise IndexError(index)
        spec, g = self.scene(index)
        return Example(spec.caption, video=render(spec, self.config, g))


def _shape_mask(shape: str, dx: Tensor, dy: Tensor, r: float, angle: float) -> Tensor:
    """Soft (anti-aliased) coverage in [0, 1] of a shape of radius r at offsets (dx, dy) in pixels."""
    if shape in ("circle",):
        sdf = (dx ** 2 + dy ** 2).sqrt() - r
    elif shape == "ring":
        sdf = ((dx ** 2 + dy ** 2).sqrt() - 0.72 * r).abs() - 0.28 * r
    elif shape in ("square", "box"):
        c, s = math.cos(angle), math.sin(angle)
        u, v = c * dx + s * dy, -s * dx + c * dy
        sdf = torch.maximum(u.abs(), v.abs()) - 0.85 * r
    elif shape == "triangle":  # apex up (image y grows downward): three half-planes, inradius r/2
        k = math.sqrt(3.0) / 2
        sdf = torch.maximum(torch.maximum(dy, k * dx - 0.5 * dy), -k * dx - 0.5 * dy) - 0.5 * r
    elif shape == "star":
        theta = torch.atan2(dy, dx) + angle
        rad = r * (0.62 + 0.38 * torch.cos(5 * theta))
        sdf = (dx ** 2 + dy ** 2).sqrt() - rad
    else:
        raise NdoptError(f"unknown shape {shape!r}")
    return (0.5 - sdf).clamp(0.0, 1.0)


def render(spec: SceneSpec, cfg: ProceduralConfig, g: torch.Generator) -> Tensor:
    """[3, F, H, W] in [-1, 1]: the shape moves at constant speed; it starts where it stays in frame."""
    h, w, f = cfg.height, cfg.width, cfg.frames
    u = torch.rand(8, generator=g)
    lo, hi = SIZES[spec.size]
    r = (lo + (hi - lo) * float(u[0])) * min(h, w)
    speed = (cfg.speed[0] + (cfg.speed[1] - cfg.speed[0]) * float(u[1])) * w / 64
    vx, vy = (d * speed for d in DIRECTIONS[spec.direction])
    travel_x, travel_y = vx * (f - 1), vy * (f - 1)
    margin = r + 1
    # start so that the whole path stays inside the frame
    x_lo, x_hi = margin - min(0.0, travel_x), w - margin - max(0.0, travel_x)
    y_lo, y_hi = margin - min(0.0, travel_y), h - margin - max(0.0, travel_y)
    x0 = x_lo + (max(x_hi, x_lo) - x_lo) * float(u[2])
    y0 = y_lo + (max(y_hi, y_lo) - y_lo) * float(u[3])
    angle = float(u[4]) * 0.3
    jitter = (torch.rand(2, 3, generator=g) - 0.5) * 0.08  # small colour variation per clip
    fg = (torch.tensor(colour_rgb(spec.colour)) + jitter[0]).clamp(0, 1)
    bg = (torch.tensor(colour_rgb(spec.background)) + jitter[1]).clamp(0, 1)
    ys = torch.arange(h, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(w, dtype=torch.float32)[None, :] + 0.5
    frames = []
    for t in range(f):
        m = _shape_mask(spec.shape, xs - (x0 + vx * t), ys - (y0 + vy * t), r, angle)
        frames.append(bg[:, None, None] * (1 - m) + fg[:, None, None] * m)
    return torch.stack(frames, dim=1) * 2 - 1


def caption_words(config: ProceduralConfig = ProceduralConfig()) -> set[str]:
    """Every word any caption of `config` can contain (the tokenizer must know each one whole)."""
    words = {"a", "moving", "on", "background"}
    words |= set(config.colours) | set(config.shapes) | set(config.backgrounds)
    words |= {d for d in config.directions if d != "still"} | {s for s in config.sizes if s}
    return words


# ---- real data: a folder of videos with captions ---------------------------------------------
class FolderVideos:
    """`root/captions.jsonl` with lines {"video": "relative/path.mp4", "caption": "..."}.

    Videos are read with imageio, centre-cropped and resized to (height, width), and cut to the
    first `frames` frames (1 + 8k, the causal VAE's clip lengths)."""

    def __init__(self, root: Path | str, *, frames: int = 9, height: int = 64, width: int = 64) -> None:
        self.root = Path(root)
        index = self.root / "captions.jsonl"
        if not index.is_file():
            raise NdoptError(f"{self.root}: no captions.jsonl (one JSON line per clip: "
                             '{"video": "clip.mp4", "caption": "..."})')
        self.items: list[tuple[Path, str]] = []
        for n, line in enumerate(index.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                self.items.append((self.root / rec["video"], str(rec["caption"])))
            except (ValueError, KeyError, TypeError) as e:
                raise NdoptError(f"{index}:{n}: expected {{\"video\": ..., \"caption\": ...}}: {e}") from None
        if not self.items:
            raise NdoptError(f"{index} lists no clips")
        if (frames - 1) % 8:
            raise NdoptError(f"FolderVideos frames={frames}: the causal VAE needs 1 + 8k frames")
        self.frames, self.height, self.width = frames, height, width

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Example:
        path, caption = self.items[index]
        return Example(caption, video=read_clip(path, self.frames, self.height, self.width))


def read_clip(path: Path, frames: int, height: int, width: int) -> Tensor:
    """[3, frames, height, width] in [-1, 1] from a video file (or a still image, repeated)."""
    import imageio.v3 as iio
    import torch.nn.functional as F

    try:
        arr = iio.imread(path)
    except Exception as e:  # imageio raises plugin-specific errors
        raise NdoptError(f"{path}: cannot read the video ({e})") from None
    x = torch.as_tensor(arr).float() / 127.5 - 1
    if x.dim() == 3:  # a still image: [H, W, C]
        x = x[None]
    x = x[..., :3].permute(0, 3, 1, 2)  # [T, 3, H, W]
    if x.shape[0] < frames:
        raise NdoptError(f"{path}: {x.shape[0]} frames, need at least {frames}")
    x = x[:frames]
    th, tw = x.shape[-2:]
    scale = max(height / th, width / tw)
    x = F.interpolate(x, size=(max(height, round(th * scale)), max(width, round(tw * scale))),
                      mode="bilinear", align_corners=False, antialias=True)
    top, left = (x.shape[-2] - height) // 2, (x.shape[-1] - width) // 2
    x = x[..., top:top + height, left:left + width]
    return x.permute(1, 0, 2, 3).contiguous().clamp(-1, 1)


# ---- which clips a fine-tune reads (a pass config's `data`) ------------------------------------
class DataConfig(BaseModel):
    """Fine-tuning clips: procedural captioned videos, or a folder with captions.jsonl.

    The recipe-facing fields of the fine-tuning passes' `data`; the seed of procedural clips is the
    run's (`seeded(ctx.seed)`), never a recipe field, so one recipe draws the same clips per seed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field("procedural", description="`procedural`, or a folder holding captions.jsonl and its videos")
    clips: int = Field(512, ge=1, description="clips encoded once through the pipeline's VAE encoder")
    frames: int = Field(9, description="frames per clip (1 + 8k, the causal VAE's clip lengths)")
    height: int = Field(64, description="clip height in pixels")
    width: int = Field(64, description="clip width in pixels")
    _seed: int = PrivateAttr(0)

    @property
    def seed(self) -> int:
        return self._seed

    def seeded(self, seed: int) -> DataConfig:
        """This config drawing procedural clips from `seed` (a pass gives its context's seed)."""
        out = self.model_copy()
        out._seed = int(seed)
        return out

    def dataset(self) -> tuple[ProceduralVideos | FolderVideos, str]:
        """The clip dataset this config names, and its latent-cache name."""
        if self.source == "procedural":
            pc = ProceduralConfig(frames=self.frames, height=self.height, width=self.width)
            return ProceduralVideos(pc, seed=self.seed + 7), f"procedural-{pc.fingerprint()}-s{self.seed}"
        ds = FolderVideos(self.source, frames=self.frames, height=self.height, width=self.width)
        return ds, Path(self.source).name or "folder"


# ---- latents cached through the VAE encoder --------------------------------------------------
def module_fingerprint(module: nn.Module) -> str:
    """A short hash of a module's weights (cache key: a retrained encoder invalidates the cache)."""
    h = hashlib.blake2b(digest_size=8)
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class LatentCache:
    """Encodes `dataset[0:size]` once through `encoder` (normalised latents) and serves them.

    The cache file lives in `cache_dir` and is named after the dataset, the size and the encoder's
    weights; a later run with the same three reads it instead of encoding."""

    dataset: Dataset
    encoder: nn.Module
    cache_dir: Path
    size: int | None = None
    batch_size: int = 32
    name: str = "data"
    normalize: Callable[[Tensor], Tensor] | None = None  # the frontend's (default: the default one's)
    _latents: Tensor | None = field(default=None, init=False, repr=False)
    _captions: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.size = min(self.size or len(self.dataset), len(self.dataset))

    @property
    def path(self) -> Path:
        return Path(self.cache_dir) / f"latents-{self.name}-{self.size}-{module_fingerprint(self.encoder)}.safetensors"

    def load(self, progress: Any = None) -> LatentCache:
        from safetensors.torch import load_file, save_file

        from ndopt.io import atomic_path
        from ndopt.model import sampler_math

        if self._latents is not None:
            return self
        path = self.path
        if path.is_file():
            sd = load_file(str(path))
            self._latents = sd["latents"]
            self._captions = json.loads(bytes(sd["captions"].tolist()).decode())
            log.info("latent cache: read %d latents from %s", len(self._captions), path)
            return self
        device = next(self.encoder.parameters()).device
        chunks, captions = [], []
        with torch.no_grad():
            for start in range(0, self.size, self.batch_size):
                items = [self.dataset[i] for i in range(start, min(start + self.batch_size, self.size))]
                video = torch.stack([e.video for e in items]).to(device)
                norm = self.normalize or sampler_math().normalize_latents
                chunks.append(norm(self.encoder(video).float()).cpu())
                captions += [e.caption for e in items]
                if progress is not None:
                    progress(f"encoded {len(captions)}/{self.size}")
        self._latents, self._captions = torch.cat(chunks), captions
        blob = torch.tensor(list(json.dumps(captions).encode()), dtype=torch.uint8)
        with atomic_path(path) as tmp:
            save_file({"latents": self._latents.contiguous(), "captions": blob}, str(tmp))
        log.info("latent cache: encoded %d clips into %s", self.size, path)
        return self

    def __len__(self) -> int:
        return int(self.size)

    @property
    def captions(self) -> list[str]:
        if self._latents is None:
            self.load()
        return list(self._captions)

    @property
    def latents(self) -> Tensor:
        if self._latents is None:
            self.load()
        return self._latents

    def __getitem__(self, index: int) -> Example:
        if self._latents is None:
            self.load()
        return Example(self._captions[index], latents=self._latents[index])
