"""Pyramid-Flow's stage schedule: upstream's PyramidFlowMatchEulerDiscreteScheduler math, as data.

Stage windows (sigma and timestep ranges), the corrected start sigmas, the renoise coefficients at
stage boundaries and the per-step local sigmas are all functions of (stage_range, gamma, shift,
steps); computing them here once puts them in the IR's Schedule, where passes can fold them.
"""

from __future__ import annotations

import math

import numpy as np

from ndopt.ir.schedule import Guidance, Schedule, Stage, TemporalPyramid

TRAIN_TIMESTEPS = 1000
STAGE_RANGE = (0.0, 1 / 3, 2 / 3, 1.0)  # upstream default: three equal stages
GAMMA = 1 / 3  # block-noise correlation (REFERENCE.md)


def _global_sigmas(shift: float) -> np.ndarray:
    t = np.linspace(1, TRAIN_TIMESTEPS, TRAIN_TIMESTEPS, dtype=np.float32)[::-1].copy()
    sigmas = t / TRAIN_TIMESTEPS
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def corrected_start_sigma(ori_start_sigma: float, gamma: float) -> float:
    """The start sigma after the renoise that restores the signal coefficient (upstream)."""
    ori_signal = 1 - ori_start_sigma
    corrected = (1 / (math.sqrt(1 + 1 / gamma) * (1 - ori_signal) + ori_signal)) * ori_signal
    return 1 - corrected


def renoise_coefficients(stage: Stage, gamma: float) -> tuple[float, float]:
    """(alpha, beta) of `latents = alpha * up(latents) + beta * block_noise` entering a stage > 0."""
    ori_signal = 1 - stage.ori_sigma_start
    alpha = 1 / (math.sqrt(1 + 1 / gamma) * (1 - ori_signal) + ori_signal)
    beta = alpha * (1 - ori_signal) / math.sqrt(gamma)
    return alpha, beta


def pyramid_stages(steps: tuple[int, ...] = (20, 20, 20), video_steps: tuple[int, ...] = (10, 10, 10),
                   stage_range: tuple[float, ...] = STAGE_RANGE, gamma: float = GAMMA,
                   shift: float = 1.0) -> tuple[Stage, ...]:
    """The stages of upstream's scheduler; stage 0 is the lowest resolution (scale 2^-(S-1))."""
    n_stages = len(stage_range) - 1
    sigmas = _global_sigmas(shift)
    timesteps = sigmas * TRAIN_TIMESTEPS
    starts, ends, oris, dist = [], [], [], []
    for i in range(n_stages):
        start_idx = max(int(stage_range[i] * TRAIN_TIMESTEPS), 0)
        end_idx = min(int(stage_range[i + 1] * TRAIN_TIMESTEPS), TRAIN_TIMESTEPS)
        start = float(sigmas[start_idx])
        end = float(sigmas[end_idx]) if end_idx < TRAIN_TIMESTEPS else 0.0
        oris.append(start)
        if i != 0:
            start = corrected_start_sigma(start, gamma)
        starts.append(start)
        ends.append(end)
        dist.append(start - end)
    total = sum(dist)
    stages = []
    for i in range(n_stages):
        r0 = 0.0 if i == 0 else sum(dist[:i]) / total
        r1 = 1.0 if i == n_stages - 1 else sum(dist[: i + 1]) / total
        t_max = float(timesteps[int(r0 * TRAIN_TIMESTEPS)])
        t_min = float(timesteps[min(int(r1 * TRAIN_TIMESTEPS), TRAIN_TIMESTEPS - 1)])
        # upstream: linspace(t_max, t_min, N + 1)[:-1], whose last element is the stage's last timestep
        t_last = t_max + (t_min - t_max) * (TRAIN_TIMESTEPS - 1) / TRAIN_TIMESTEPS
        stages.append(Stage(scale=2.0 ** -(n_stages - 1 - i), sigma_start=starts[i], sigma_end=ends[i],
                            timestep_start=t_max, timestep_end=t_last, steps=steps[i],
                            video_steps=video_steps[i], ori_sigma_start=oris[i]))
    return tuple(stages)


def stage_timesteps(stage: Stage, n: int) -> list[float]:
    """The timesteps fed to the DiT at each of the stage's n steps (upstream set_timesteps)."""
    return [float(x) for x in np.linspace(stage.timestep_start, stage.timestep_end, n)]


def stage_local_sigmas(n: int) -> list[float]:
    """Local Euler sigmas within a stage: linspace(1, 1/N_train, n) then 0 (upstream set_timesteps)."""
    return [float(x) for x in np.linspace(1.0, 1.0 / TRAIN_TIMESTEPS, n)] + [0.0]


def pyramid_flow_schedule(*, latent_frames: int, height: int, width: int,
                          steps: tuple[int, ...] = (20, 20, 20), video_steps: tuple[int, ...] = (10, 10, 10),
                          guidance_scale: float = 7.0, video_guidance_scale: float = 5.0) -> Schedule:
    """Pyramid-Flow's default inference schedule (README: 20-20-20 / 10-10-10, CFG 7 / 5)."""
    return Schedule(stages=pyramid_stages(steps, video_steps), guidance=Guidance("cfg", guidance_scale,
                    video_guidance_scale), temporal=TemporalPyramid(True, 1), latent_frames=latent_frames,
                    height=height, width=width, gamma=GAMMA)
