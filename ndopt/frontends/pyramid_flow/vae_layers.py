"""Building blocks of Pyramid-Flow's causal video VAE (upstream `video_vae/modeling_*.py`).

Our own code, written against upstream's module tree: every attribute that holds a parameter has
upstream's name (`resnets`, `downsamplers`, `temporal_upsamplers`, `conv` inside a causal conv,
`to_q` ... in the attention), so an upstream state dict loads with `strict=True`.

Time is causal everywhere: convolutions pad only on the past side (zeros, upstream's
`pad_mode='constant'`); norms and attention act on each frame alone. The forward passes have no
Python control flow on tensor values, so they trace at static shapes. Layouts stay at rank <= 5
(Hexagon, REFERENCE.md): frames are folded into the batch for per-frame ops.

Streaming (upstream's `temporal_chunk`): inside `streaming(module)` each causal conv keeps the
tail of its padded input that its next window still needs and prepends it to the next chunk, so
decoding chunk by chunk equals decoding the whole clip.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# upstream resnets and norms use eps=1e-6 throughout (modeling_enc_dec.py, modeling_block.py)
EPS = 1e-6

# diffusers' get_activation, the names upstream's configs may use
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "mish": nn.Mish,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
}


def activation(name: str) -> nn.Module:
    return _ACTIVATIONS[name]()


def frames_to_batch(x: Tensor) -> Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W]."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def batch_to_frames(x: Tensor, batch: int) -> Tensor:
    """[B*T, C, H, W] -> [B, C, T, H, W]."""
    bt, c, h, w = x.shape
    return x.reshape(batch, bt // batch, c, h, w).transpose(1, 2)


class CausalGroupNorm(nn.GroupNorm):
    """GroupNorm over each frame alone (statistics never mix frames, so it is causal)."""

    def forward(self, x: Tensor) -> Tensor:
        return batch_to_frames(super().forward(frames_to_batch(x)), x.shape[0])


class CausalConv3d(nn.Module):
    """Conv3d padded in time on the past side only: output frame t sees input frames <= t."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, bias: bool = True) -> None:
        super().__init__()
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        # upstream: an int stride strides time only; spatial downsamplers pass (1, 2, 2)
        stride = (stride, 1, 1) if isinstance(stride, int) else tuple(stride)
        self.time_kernel_size, self.temporal_stride = kt, stride[0]
        self.time_pad = kt - 1
        self.spatial_padding = (kw // 2, kw // 2, kh // 2, kh // 2)
        self.conv = nn.Conv3d(in_channels, out_channels, (kt, kh, kw), stride=stride, bias=bias)
        self._streaming = False
        self._carry: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self._streaming or self._carry is None:
            x = F.pad(x, (*self.spatial_padding, self.time_pad, 0))
        else:
            x = torch.cat([self._carry, F.pad(x, self.spatial_padding)], dim=2)
        if self._streaming:
            # the padded frames from the first window the conv has not reached yet
            windows = (x.shape[2] - self.time_kernel_size) // self.temporal_stride + 1
            self._carry = x[:, :, windows * self.temporal_stride:].detach()
        return self.conv(x)

    def start_stream(self) -> None:
        self._streaming, self._carry = True, None

    def end_stream(self) -> None:
        self._streaming, self._carry = False, None


class CausalResnetBlock3D(nn.Module):
    """norm1 -> act -> conv1 -> norm2 -> act -> conv2, plus a 1x1x1 shortcut when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, act_fn: str) -> None:
        super().__init__()
        self.norm1 = CausalGroupNorm(groups, in_channels, eps=EPS)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = CausalGroupNorm(groups, out_channels, eps=EPS)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.nonlinearity = activation(act_fn)
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = self.conv2(self.nonlinearity(self.norm2(h)))
        # upstream's output_scale_factor is 1 for every block of the VAE
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SpatialAttention(nn.Module):
    """Single-head self-attention over the pixels of each frame, with a residual.

    Upstream uses diffusers' `Attention(C, heads=1, dim_head=C, norm_num_groups=groups,
    residual_connection=True, _from_deprecated_attn_block=True)` on frames folded into the batch;
    the parameter names are diffusers'. Written with matmul + softmax, not SDPA, so that every op
    can carry a quantization encoding (REFERENCE.md, AIMET).
    """

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])
        self.scale = channels**-0.5

    def forward(self, x: Tensor) -> Tensor:
        frames = frames_to_batch(x)
        n, c, h, w = frames.shape
        tokens = self.group_norm(frames.reshape(n, c, h * w)).transpose(1, 2)  # [N, HW, C]
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        # upstream upcasts the softmax (upcast_softmax=True)
        weights = torch.softmax((q @ k.transpose(1, 2) * self.scale).float(), dim=-1).to(v.dtype)
        out = self.to_out[1](self.to_out[0](weights @ v))
        out = out.transpose(1, 2).reshape(n, c, h, w)
        return x + batch_to_frames(out, x.shape[0])


class CausalMidBlock(nn.Module):
    """Upstream `CausalUNetMidBlock2D` with one layer: resnet, per-frame attention, resnet."""

    def __init__(self, channels: int, groups: int, act_fn: str) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([SpatialAttention(channels, groups)])
        self.resnets = nn.ModuleList([CausalResnetBlock3D(channels, channels, groups, act_fn) for _ in range(2)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            x = resnet(attn(x))
        return x


class SpatialDownsample2x(nn.Module):
    """Upstream `CausalDownsample2x`: a 3x3x3 causal conv with stride (1, 2, 2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=(1, 2, 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class TemporalDownsample2x(nn.Module):
    """Upstream `CausalTemporalDownsample2x`: a 3x3x3 causal conv with stride (2, 1, 1).

    With two past frames of padding, 1 + 2k frames become 1 + k: the first frame alone makes the
    first output, so three of these map 1 + 8k frames to 1 + k latents.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class SpatialUpsample2x(nn.Module):
    """Upstream `CausalUpsample2x`: causal conv to 4C, then depth-to-space per frame.

    Upstream's `rearrange('b (c p1 p2) t h w -> b c t (h p1) (w p2)')` is pixel_shuffle(2) on each frame.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, channels * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return batch_to_frames(F.pixel_shuffle(frames_to_batch(self.conv(x)), 2), x.shape[0])


class TemporalUpsample2x(nn.Module):
    """Upstream `CausalTemporalUpsample2x`: causal conv to 2C, depth-to-time, drop the first frame.

    Each frame becomes two; the first of the clip's first pair is dropped, so 1 + k frames become
    1 + 2k (the first latent frame decodes to one frame, like the encoder's first frame).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, channels * 2, 3)
        self._streaming = False
        self._started = False

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        # channel index is c * 2 + p and output frame is t * 2 + p ('b (c p) t h w -> b c (t p) h w')
        y = self.conv(x).reshape(b, c, 2, t, h * w).transpose(2, 3).reshape(b, c, 2 * t, h, w)
        if not self._streaming:
            return y[:, :, 1:]
        first_chunk, self._started = not self._started, True
        return y[:, :, 1:] if first_chunk else y

    def start_stream(self) -> None:
        self._streaming, self._started = True, False

    def end_stream(self) -> None:
        self._streaming, self._started = False, False


class CausalDownBlock(nn.Module):
    """Upstream `DownEncoderBlockCausal3D`: resnets, then optional spatial and temporal downsampling."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str,
                 spatial: bool, temporal: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            CausalResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn)
            for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([SpatialDownsample2x(out_channels)]) if spatial else None
        self.temporal_downsamplers = nn.ModuleList([TemporalDownsample2x(out_channels)]) if temporal else None

    def forward(self, x: Tensor) -> Tensor:
        for layer in (*self.resnets, *(self.downsamplers or ()), *(self.temporal_downsamplers or ())):
            x = layer(x)
        return x


class CausalUpBlock(nn.Module):
    """Upstream `UpDecoderBlockCausal3D`: resnets, then optional spatial and temporal upsampling."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str,
                 spatial: bool, temporal: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            CausalResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn)
            for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([SpatialUpsample2x(out_channels)]) if spatial else None
        self.temporal_upsamplers = nn.ModuleList([TemporalUpsample2x(out_channels)]) if temporal else None

    def forward(self, x: Tensor) -> Tensor:
        for layer in (*self.resnets, *(self.upsamplers or ()), *(self.temporal_upsamplers or ())):
            x = layer(x)
        return x


class CausalEncoder(nn.Module):
    """Upstream `CausalVaeEncoder`: conv_in, down blocks, mid block, norm-act-conv to 2 x latent (mean, logvar)."""

    def __init__(self, in_channels: int, latent_channels: int, block_out_channels: Sequence[int],
                 layers_per_block: Sequence[int], spatial_down: Sequence[bool], temporal_down: Sequence[bool],
                 groups: int, act_fn: str) -> None:
        super().__init__()
        self.conv_in = CausalConv3d(in_channels, block_out_channels[0], 3)
        widths = [block_out_channels[0], *block_out_channels]
        self.down_blocks = nn.ModuleList(
            CausalDownBlock(widths[i], widths[i + 1], layers_per_block[i], groups, act_fn,
                            spatial_down[i], temporal_down[i])
            for i in range(len(block_out_channels))
        )
        self.mid_block = CausalMidBlock(block_out_channels[-1], groups, act_fn)
        self.conv_norm_out = CausalGroupNorm(groups, block_out_channels[-1], eps=EPS)
        self.conv_act = nn.SiLU()  # upstream hard-codes SiLU here, whatever act_fn says
        # upstream passes double_z=True whatever its config says: mean and logvar
        self.conv_out = CausalConv3d(block_out_channels[-1], 2 * latent_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class CausalDecoder(nn.Module):
    """Upstream `CausalVaeDecoder`: conv_in, mid block, up blocks (widths reversed), norm-act-conv to RGB."""

    def __init__(self, latent_channels: int, out_channels: int, block_out_channels: Sequence[int],
                 layers_per_block: Sequence[int], spatial_up: Sequence[bool], temporal_up: Sequence[bool],
                 groups: int, act_fn: str) -> None:
        super().__init__()
        self.conv_in = CausalConv3d(latent_channels, block_out_channels[-1], 3)
        widths = list(reversed(block_out_channels))
        widths = [widths[0], *widths]
        self.up_blocks = nn.ModuleList(
            CausalUpBlock(widths[i], widths[i + 1], layers_per_block[i], groups, act_fn,
                          spatial_up[i], temporal_up[i])
            for i in range(len(block_out_channels))
        )
        # registered after up_blocks, as upstream does, so the state dicts list keys in the same order
        self.mid_block = CausalMidBlock(block_out_channels[-1], groups, act_fn)
        self.conv_norm_out = CausalGroupNorm(groups, block_out_channels[0], eps=EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = CausalConv3d(block_out_channels[0], out_channels, 3)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


@contextmanager
def streaming(*modules: nn.Module) -> Iterator[None]:
    """Feed the modules' causal convs one time chunk per call; the state is dropped on exit."""
    stateful = [m for root in modules for m in root.modules() if isinstance(m, (CausalConv3d, TemporalUpsample2x))]
    for m in stateful:
        m.start_stream()
    try:
        yield
    finally:
        for m in stateful:
            m.end_stream()
