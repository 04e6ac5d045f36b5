"""A tiny causal video decoder (TAEHV style): Neodragon's replacement for the 226M VAE decoder.

Written from Neodragon's modified TAEHV decoder (`neodragon/asymmetric_causal_video_vae/decoder.py`,
MIT, adapted there from madebyollin/taehv): per-frame 2D convolutions, `MemBlock`s that see the
previous frame's features (the only temporal mixing, so the decoder is frame-causal), and three
stages that each double the resolution (nearest upsampling) and the frame rate (`TGrow`: a 1x1
conv whose channels become frames). Latents [B, 16, t, h, w] -> video [B, 3, 8t - 7, 8h, 8w]: the
first 7 of the 8t frames are trimmed, so the first latent frame gives exactly one video frame,
as Pyramid-Flow's causal VAE (1 + 8k frames). ~9.91M parameters at Neodragon's widths.

Neodragon keeps the VAE's 1x1x1 `post_quant_conv` in front of its decoder; so do we (per frame,
as a 1x1 Conv2d). Everything runs on [B*T, C, H, W] tensors (rank 4, what Hexagon prefers), and
the forward is one static graph per latent shape (no Python control flow on values).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class TinyDecoderConfig:
    """Widths per stage (`n_f`, Neodragon's `decoder_num_features`) and the up-sampling pattern."""

    latent_channels: int = 16
    image_channels: int = 3
    n_f: tuple[int, ...] = (256, 128, 64, 64)   # Neodragon's TAEHVDecoder default
    mem_blocks: int = 3                         # MemBlocks per stage (TAEHV: 3)
    time_upscale: tuple[bool, ...] = (True, True, True)
    space_upscale: tuple[bool, ...] = (True, True, True)

    def __post_init__(self) -> None:
        stages = len(self.n_f) - 1
        if len(self.time_upscale) != stages or len(self.space_upscale) != stages:
            raise ValueError(f"TinyDecoderConfig: {len(self.n_f)} widths make {stages} stages; give "
                             f"{stages} time_upscale and space_upscale flags")

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.time_upscale)

    @property
    def spatial_factor(self) -> int:
        return 2 ** sum(self.space_upscale)


def tiny_preset_config(latent_channels: int = 16) -> TinyDecoderConfig:
    """Widths for the tiny Pyramid-Flow preset: 8x narrower, one MemBlock per stage (~71K parameters,
    a third of the tiny native decoder; wider first and shallower stages learn fastest in short runs)."""
    return TinyDecoderConfig(latent_channels=latent_channels, n_f=(32, 16, 16, 8), mem_blocks=1)


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """tanh(x / 3) * 3: keeps outlier latents in range (TAEHV's `Clamp`)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """A residual block over [this frame, previous frame] features (zeros before the first frame)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(),
                                  _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU()
        self._streaming = False
        self._last: Tensor | None = None  # streaming: the previous chunk's last frame (the causal cache)

    def start_stream(self) -> None:
        self._streaming, self._last = True, None

    def end_stream(self) -> None:
        self._streaming, self._last = False, None

    def forward(self, x: Tensor, frames: int) -> Tensor:
        """x: [B*T, C, H, W] frames of B clips of T frames each."""
        bt, c, h, w = x.shape
        clips = x.reshape(bt // frames, frames, c, h, w)
        if self._streaming and self._last is not None:  # a later chunk: its first frame's past is cached
            past = torch.cat([self._last, clips[:, :-1]], dim=1).reshape(bt, c, h, w)
        else:
            past = F.pad(clips, (0, 0, 0, 0, 0, 0, 1, 0))[:, :frames].reshape(bt, c, h, w)
        if self._streaming:
            self._last = clips[:, -1:]
        return self.act(self.conv(torch.cat([x, past], dim=1)) + self.skip(x))


class TGrow(nn.Module):
    """Each frame becomes `stride` frames: a 1x1 conv to stride x C channels, channels to frames."""

    def __init__(self, n_f: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        bt, c, h, w = x.shape
        return self.conv(x).reshape(bt * self.stride, c, h, w)


class TinyVideoDecoder(nn.Module):
    """The `vae_decoder` component: raw latents [B, C, t, h, w] -> video [B, 3, 8t - 7, 8h, 8w].

    `window_size` (latent frames per chunk after the first chunk's window_size + 1, None = whole
    clip) decodes chunk by chunk: each MemBlock caches its last frame for the next chunk, so the
    result equals the whole-clip decode with a chunk's activations (the memory plan's decode)."""

    def __init__(self, config: TinyDecoderConfig = TinyDecoderConfig(), window_size: int | None = None) -> None:
        super().__init__()
        self.window_size = window_size
        self.config = c = config
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1)
        blocks: list[nn.Module] = [SoftClamp(), _conv(c.latent_channels, c.n_f[0]), nn.ReLU()]
        for i in range(len(c.n_f) - 1):
            blocks += [MemBlock(c.n_f[i], c.n_f[i]) for _ in range(c.mem_blocks)]
            blocks += [nn.Upsample(scale_factor=2 if c.space_upscale[i] else 1),
                       TGrow(c.n_f[i], 2 if c.time_upscale[i] else 1), _conv(c.n_f[i], c.n_f[i + 1], bias=False)]
        blocks += [nn.ReLU(), _conv(c.n_f[-1], c.image_channels)]
        self.blocks = nn.ModuleList(blocks)
        self.frames_to_trim = c.temporal_factor - 1
        # How each block is called, fixed here: passes may replace blocks by other modules (AIMET's
        # quantizable copies, fx GraphModules), so forward must not dispatch on the blocks' types.
        self._takes_frames = tuple(isinstance(b, MemBlock) for b in blocks)
        self._time_stride = tuple(b.stride if isinstance(b, TGrow) else 1 for b in blocks)

    def forward(self, z: Tensor) -> Tensor:
        w = self.window_size
        if w is None or z.shape[2] <= w + 1:
            return self._decode(z, trim=True)
        if w < 1:
            raise ValueError(f"tiny decoder: window_size must be >= 1, got {w}")
        starts = [0, *range(w + 1, z.shape[2], w)]
        ends = [*starts[1:], z.shape[2]]
        mem = [m for m in self.modules() if isinstance(m, MemBlock)]
        for m in mem:
            m.start_stream()
        try:
            chunks = [self._decode(z[:, :, a:b], trim=a == 0) for a, b in zip(starts, ends, strict=True)]
        finally:
            for m in mem:
                m.end_stream()
        return torch.cat(chunks, dim=2)

    def _decode(self, z: Tensor, trim: bool) -> Tensor:
        b, c, t, h, w = z.shape
        x = self.post_quant_conv(z.transpose(1, 2).reshape(b * t, c, h, w))
        frames = t
        for block, takes_frames, stride in zip(self.blocks, self._takes_frames, self._time_stride):
            x = block(x, frames) if takes_frames else block(x)
            frames *= stride
        _, oc, oh, ow = x.shape
        video = x.reshape(b, frames, oc, oh, ow)[:, self.frames_to_trim if trim else 0:]
        return video.transpose(1, 2)
