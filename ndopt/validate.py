"""The boundary checks: every size, path and text a user gives is checked before any work starts.

The CLI and the library entry points (`ndopt.run`, `plan`, `generate`) call these before a model
is loaded or a step runs, so a wrong value costs a second, not a run: sizes for sign, divisibility
and the model's limits (read from the pipeline's sampler), and for memory against this machine;
output paths for their format and for whether they can be written; prompts for UTF-8.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ndopt.errors import InputError

# ndopt plan enumerates one DiT call signature per autoregressive unit: past this many latent frames
# (1,025 video frames; Pyramid-Flow itself generates at most 241) a plan would take minutes.
MAX_PLAN_LATENT_FRAMES = 129
VIDEO_FORMATS = ("mp4", "gif", "png")
MAX_STEPS = 1000  # per pyramid stage (Pyramid-Flow samples 20; a typo like 40000 would run for days)
MAX_SEED = 2**63 - 1  # torch.manual_seed's range


def _int(value: Any, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{option} {value!r}: give a whole number")
    return value


def limits(pipeline: Any) -> dict[str, int]:
    """The pipeline sampler's size rules (`temporal`, `multiple`, `max_side`); none if it states none."""
    fn = getattr(pipeline.sampler, "video_limits", None)
    return dict(fn(pipeline)) if callable(fn) else {}


def video_frames_to_latent(frames: Any, pipeline: Any, option: str = "--frames") -> int:
    """Video frames (1 + 8k for Pyramid-Flow's causal VAE) to latent frames, refusing other counts."""
    frames = _int(frames, option)
    t = limits(pipeline).get("temporal", 1)
    if frames < 1 or (frames - 1) % t:
        examples = ", ".join(str(1 + t * k) for k in range(4))
        raise InputError(f"{option} {frames}: the causal VAE makes 1 + {t}k frames ({examples}, ...)")
    return 1 + (frames - 1) // t


def check_size(pipeline: Any, *, latent_frames: Any = None, height: Any = None, width: Any = None,
               frames_option: str = "--frames", max_latent_frames: int | None = None) -> None:
    """Sign, divisibility and the model's limits of a video size (None: the pipeline's own)."""
    rules = limits(pipeline)
    if latent_frames is not None:
        n = _int(latent_frames, frames_option)
        if n < 1:
            raise InputError(f"{frames_option} {n}: a video has at least one latent frame")
        if max_latent_frames is not None and n > max_latent_frames:
            t = rules.get("temporal", 1)
            raise InputError(f"{frames_option}: {n} latent frames ({1 + t * (n - 1)} video frames) is more than "
                             f"ndopt plans ({max_latent_frames} latent, {1 + t * (max_latent_frames - 1)} video "
                             "frames)")
    for option, value in (("--height", height), ("--width", width)):
        if value is None:
            continue
        v = _int(value, option)
        m = rules.get("multiple", 1)
        top = rules.get("max_side")
        if v < 1:
            raise InputError(f"{option} {v}: must be positive (a multiple of {m})")
        if top is not None and v > top:
            raise InputError(f"{option} {v}: the DiT's position table covers at most {top} pixels per side "
                             "(pos_embed_max_size x patch x 8x VAE)")
        if v % m:
            raise InputError(f"{option} {v}: must be a multiple of {m} (every pyramid stage's latent grid a whole "
                             f"number of patches); nearest: {max(m, round(v / m) * m)}")


def memory_estimate(pipeline: Any, batch: int = 1) -> dict[str, int]:
    """About the host memory sampling and decoding one video takes (bytes): the weights, plus three
    times each component's largest activation (its input, its output, a temporary). The largest
    activation of the DiT and the decoder is measured by shape runs at the two smallest square videos
    of three latent frames (a second on the meta device; one frame would count the causal padding
    thrice) and extrapolated linearly to the video's latent positions (the DiT, times the batch) or
    pixels (the decoder, one video at a time): convolution and token-wise activations grow linearly,
    and the line's intercept keeps the text tokens. Components run one after another: the peak is
    the weights plus the largest of them (`check_memory`)."""
    from ndopt.ir.cost import CostModel

    sch = pipeline.schedule
    rules = limits(pipeline)
    t, m = rules.get("temporal", 1), rules.get("multiple", 1)
    costs = CostModel()
    points: dict[str, list[int]] = {}
    n = 3
    for side in (m, 2 * m):
        small = pipeline.replace(schedule=sch.with_frames(n, side, side))
        biggest: dict[str, Any] = {}  # per component, its call with the largest inputs (the last full-res step)
        for sig in small.call_plan():
            if small[sig.component].role in ("dit", "vae_decoder") and (
                    sig.component not in biggest or sig.input_bytes() > biggest[sig.component].input_bytes()):
                biggest[sig.component] = sig
        largest = {name: costs.run(small[name], sig).largest_activation_bytes for name, sig in biggest.items()}
        for name, nbytes in largest.items():
            points.setdefault(name, []).append(nbytes)
    est = {"weights": sum(c.weight_bytes() for c in pipeline.components.values())}
    for name, (a, b) in points.items():
        frames = 1 + t * (n - 1) if pipeline[name].role == "vae_decoder" else n
        base = frames * m * m  # pixels (decoder) or latent positions (DiT) of the smaller run
        per = max(0.0, (b - a) / (3 * base))  # the larger run has 4x the pixels
        if pipeline[name].role == "vae_decoder":
            largest_bytes = a + per * ((1 + t * (sch.latent_frames - 1)) * sch.height * sch.width - base)
        else:
            largest_bytes = batch * (a + per * (sch.latent_frames * sch.height * sch.width - base))
        est[name] = int(2 * max(a, largest_bytes))  # an op's input and output
    return est


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


# No DiT or decoder of this family comes near this many activation bytes per video pixel (upstream's
# decoder peaks at about 1 KB): below the bound there is no need to measure.
GENEROUS_BYTES_PER_PIXEL = 16 * 1024


def check_memory(pipeline: Any, what: str, batch: int = 1) -> None:
    """Refuse a video this machine cannot hold, before anything is allocated (measured by
    `memory_estimate` only when a generous bound does not already fit)."""
    sch = pipeline.schedule
    pixels = (1 + limits(pipeline).get("temporal", 1) * (sch.latent_frames - 1)) * sch.height * sch.width
    weights = sum(c.weight_bytes() for c in pipeline.components.values())
    if weights + GENEROUS_BYTES_PER_PIXEL * pixels * batch <= available_memory():
        return
    est = memory_estimate(pipeline, batch)
    need, have = est["weights"] + max((v for k, v in est.items() if k != "weights"), default=0), available_memory()
    if need > have:
        sch = pipeline.schedule
        parts = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in sorted(est.items(), key=lambda kv: -kv[1])[:3])
        raise InputError(f"{what}: {sch.latent_frames} latent frames at {sch.height}x{sch.width} need about "
                         f"{need / 2**30:.1f} GiB ({parts} GiB) and this machine has {have / 2**30:.1f} GiB "
                         "available; choose fewer frames or a smaller size")


def check_text(text: Any, option: str) -> str:
    """A prompt: a str that is valid UTF-8 (command-line bytes that are not arrive as surrogates)."""
    if not isinstance(text, str):
        raise InputError(f"{option}: give text, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        byte = f"byte {c - 0xDC00:#04x}" if 0xDC80 <= c <= 0xDCFF else f"character U+{c:04X}"  # surrogateescape
        raise InputError(f"{option}: not valid UTF-8 text ({byte} at position {e.start})") from None
    return text


def _first_existing(path: Path) -> Path:
    p = path
    while not p.exists() and not p.is_symlink() and p != p.parent:
        p = p.parent
    return p


def check_writable_dir(path: Any, option: str, shown: Any = None) -> Path:
    """A directory that exists or can be created here, and written; nothing is created."""
    path = Path(path)
    shown = path if shown is None else shown
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {shown}: {path} exists and is not a directory")
    base = _first_existing(path.absolute())
    if not base.is_dir():
        raise InputError(f"{option} {shown}: cannot be created: {base} is a file, not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"{option} {shown}: cannot be written: {base} is not writable")
    return path


def check_output_file(path: Any, option: str, fmt: str | None = None, formats: tuple[str, ...] = VIDEO_FORMATS
                      ) -> str:
    """An output file: a supported format (given or from the suffix), a writable place; returns the format."""
    path = Path(path)
    chosen = (fmt or path.suffix.lstrip(".") or formats[0]).lower()
    if chosen not in formats:
        raise InputError(f"{option} {path}: unsupported format {chosen!r}: use {', '.join(formats)} "
                         "(from the suffix, or --format)")
    if path.is_dir():
        raise InputError(f"{option} {path}: is a directory; give a file name")
    check_writable_dir(path.parent, option, path)
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{option} {path}: exists and cannot be overwritten")
    return chosen
