"""Video-level fidelity and motion: figures over every frame, not only the first.

A lossy pass on a video model most easily breaks what the first frame cannot show: later frames
(decoded from the temporally compressed latents) and motion. `video_metrics` gives per-frame latent
and pixel PSNR against a reference, the worst frame, and a temporal-consistency figure (the PSNR of
frame differences: a video whose frames are each close to the reference's but flicker scores low).
`shape_track` follows the single foreground object of a procedural frame (its centroid and
colour); `motion_direction` reads the direction of a clip's motion from that track, which
`caption_direction` reads from a procedural caption ("moving left", or "still").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from ndopt.eval.metrics import psnr

_MOVING = re.compile(r"\bmoving\s+(left|right|up|down)\b")


def latent_frame_psnrs(latents: Tensor, ref: Tensor) -> list[float]:
    """PSNR (dB) of each latent frame of [B, C, T, h, w] latents, over the reference's whole range
    (the same scale as the clip's `latent_psnr`, so frames compare with each other)."""
    rng = float(ref.max() - ref.min())
    return [psnr(latents[:, :, t], ref[:, :, t], data_range=rng) for t in range(ref.shape[2])]


def pixel_frame_psnrs(video: Tensor, ref: Tensor) -> list[float]:
    """PSNR (dB) of each frame of [B, 3, F, H, W] videos in [-1, 1] (data range 2, clamped)."""
    return [psnr(video[:, :, t].clamp(-1, 1), ref[:, :, t].clamp(-1, 1), data_range=2.0)
            for t in range(ref.shape[2])]


def temporal_psnr(video: Tensor, ref: Tensor) -> float:
    """PSNR (dB, data range 2) of the frame differences x[t+1] - x[t] against the reference's: how well
    the change between frames (motion, flicker) is kept. +inf for a one-frame clip (nothing to change)."""
    if ref.shape[2] < 2:
        return math.inf
    v, r = video.clamp(-1, 1), ref.clamp(-1, 1)
    return psnr(v[:, :, 1:] - v[:, :, :-1], r[:, :, 1:] - r[:, :, :-1], data_range=2.0)


def video_metrics(latents: Tensor, ref_latents: Tensor, video: Tensor, ref_video: Tensor) -> dict[str, object]:
    """Per-frame latent and pixel PSNR, the first and the worst frame, and temporal consistency."""
    lat = latent_frame_psnrs(latents, ref_latents)
    pix = pixel_frame_psnrs(video, ref_video)
    worst = min(range(len(pix)), key=pix.__getitem__)
    return {
        "latent_psnr_frames": lat,
        "latent_psnr_worst_frame": min(lat),
        "pixel_psnr_frames": pix,
        "pixel_psnr_first_frame": pix[0],
        "pixel_psnr_worst_frame": pix[worst],
        "worst_frame": worst,
        "temporal_psnr": temporal_psnr(video, ref_video),
    }


# ---- the object in a procedural frame, and where it goes ---------------------------------------
def foreground(frame: Tensor, threshold: float = 0.2) -> Tensor:
    """[H, W] bool: pixels of a [3, H, W] frame in [-1, 1] whose colour is `threshold` (RGB distance in
    [0, 1] units, over sqrt 3) from the frame's median border colour: the object on a plain background."""
    img = (frame.float().clamp(-1, 1) + 1) / 2
    border = torch.cat([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], dim=1)
    bg = border.median(dim=1).values[:, None, None]
    return (img - bg).norm(dim=0) > threshold * 3 ** 0.5


def object_mask(frame: Tensor, threshold: float = 0.2) -> Tensor | None:
    """`foreground` of a [3, H, W] frame, or None when fewer than 1/200 of its pixels (at least 4) stand
    out: no object to read a colour, a kind or a position from."""
    h, w = frame.shape[-2:]
    mask = foreground(frame, threshold)
    return None if int(mask.sum()) < max(4, h * w // 200) else mask


def pixel_grid(h: int, w: int) -> tuple[Tensor, Tensor]:
    """(xs [1, W], ys [H, 1]): pixel centres, the coordinates of `centroid` and the procedural renderer."""
    return (torch.arange(w, dtype=torch.float32)[None, :] + 0.5, torch.arange(h, dtype=torch.float32)[:, None] + 0.5)


def centroid(mask: Tensor) -> tuple[float, float]:
    """(x, y) in pixels of a non-empty [H, W] mask's centre of mass."""
    xs, ys = pixel_grid(*mask.shape)
    m = mask.float()
    n = float(m.sum())
    return float((m * xs).sum()) / n, float((m * ys).sum()) / n


@dataclass(frozen=True)
class Track:
    """The object's centroid (x, y, pixels) in each frame where it was found, None where it was not."""

    centroids: tuple[tuple[float, float] | None, ...]

    @property
    def found(self) -> int:
        return sum(c is not None for c in self.centroids)

    def velocity(self) -> tuple[float, float] | None:
        """Least-squares (vx, vy) in pixels per frame over the frames where the object was found."""
        pts = [(t, c) for t, c in enumerate(self.centroids) if c is not None]
        if len(pts) < 2:
            return None
        t = torch.tensor([p[0] for p in pts], dtype=torch.float64)
        xy = torch.tensor([p[1] for p in pts], dtype=torch.float64)
        tc = t - t.mean()
        denom = float((tc * tc).sum())
        v = (tc[:, None] * (xy - xy.mean(dim=0))).sum(dim=0) / denom
        return float(v[0]), float(v[1])


def shape_track(video: Tensor, threshold: float = 0.2) -> Track:
    """The track of the object in a [3, F, H, W] clip: per frame, the centroid of its foreground
    (None when fewer than 1/200 of the pixels, at least 4, stand out)."""
    masks = (object_mask(video[:, t], threshold) for t in range(video.shape[1]))
    return Track(tuple(None if m is None else centroid(m) for m in masks))


def motion_direction(video: Tensor, *, still_below: float = 0.5, threshold: float = 0.2) -> str | None:
    """'left' / 'right' / 'up' / 'down' (the dominant axis of the object's fitted velocity) or 'still'
    (under `still_below` pixels per frame at 64 px wide, scaled with the width); None when the object
    is found in fewer than half the frames (nothing to follow)."""
    track = shape_track(video, threshold)
    if track.found < max(2, (video.shape[1] + 1) // 2):
        return None
    vx, vy = track.velocity()
    if math.hypot(vx, vy) < still_below * video.shape[-1] / 64:
        return "still"
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


def caption_direction(caption: str) -> str:
    """The direction a procedural caption asks for: 'moving <dir>' gives <dir>, anything else 'still'."""
    m = _MOVING.search(caption.lower())
    return m.group(1) if m else "still"
