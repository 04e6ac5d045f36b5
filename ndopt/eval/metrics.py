"""Fidelity metrics: PSNR and relative errors between an output and its reference."""

from __future__ import annotations

import math

import torch


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB; `data_range` defaults to the reference's max - min.

    Identical tensors give +inf (reported as such; budgets compare fine against it)."""
    x, ref = x.detach().double(), ref.detach().double()
    mse = torch.mean((x - ref) ** 2).item()
    rng = float(ref.max() - ref.min()) if data_range is None else float(data_range)
    if mse == 0.0:
        return math.inf
    if rng == 0.0:
        return -math.inf
    return 10.0 * math.log10(rng * rng / mse)


def latent_metrics(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """MSE, PSNR and the relative max error (max |x - ref| / max |ref|) of latents."""
    x, ref = x.detach().double(), ref.detach().double()
    diff = (x - ref).abs()
    denom = ref.abs().max().item() or 1.0
    return {
        "latent_mse": torch.mean(diff**2).item(),
        "latent_psnr": psnr(x, ref),
        "latent_rel_err": diff.max().item() / denom,
    }


def pixel_psnr(video: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR of decoded videos in [-1, 1] (data range 2), clamped as a viewer would show them."""
    return psnr(video.clamp(-1, 1), ref.clamp(-1, 1), data_range=2.0)
