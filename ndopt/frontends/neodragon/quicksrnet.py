"""QuickSRNet (Berger et al. 2023, arXiv:2303.04336): the plain 2x super-resolution network that
upscales Neodragon's generated frames on the NPU, with its bicubic baseline and PSNR.

The network, as published in aimet-model-zoo (`aimet_zoo_torch/quicksrnet/model/models.py`,
`QuickSRNetBase`): a 3x3 conv from RGB to `num_channels`, `num_intermediate_layers` 3x3 convs,
each followed by a clipped ReLU (Hardtanh(0, 1)), a last 3x3 conv to 3 * scale^2 channels, an
optional input-to-output ("ito") connection (a trainable 1x1 conv initialised to nearest
upsampling, added before the shuffle), a clip to [0, 1], and depth-to-space (PixelShuffle).
The published model works on [0, 1] images; `forward` maps ndopt's [-1, 1] frames in and out.
Parameter names equal upstream's, so its float checkpoints' `state_dict` loads with `load_into`.

Initialisation follows upstream's `initialize()`: every conv of the trunk gets +1 on its identity
taps (the centre tap of channel i -> i, i < min(in, out)), and without the ito connection the last
conv gets +1 on the taps that repeat input channel c into its scale^2 sub-pixels. Added to the
default-initialised weights, so an untrained net is nearest upsampling plus the random convs' output
(exactly nearest only with the random part zeroed).

One addition (`edge_padding`, on by default; off is upstream's graph): the frame is replicate-padded
by the receptive radius (the number of 3x3 convs) and the output cropped back. Upstream's convs pad
with zeros, i.e. black in [0, 1]; a net that interpolates then darkens every border unless it learns
to detect them, and on 64x64 frames the zero padding reaches 23% of the pixels (on 320x512, 4%).
Bicubic clamps its taps at the border; with edge padding the net sees the same border.

The graph is what NPUs run well: after onnxsim, Mul, Add, Pad (edge), Conv and Clip pairs, Slice,
DepthToSpace, Mul, Sub on rank-4 tensors, with no Python control flow on values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ndopt.errors import CheckpointError, ConfigError

TINY_SR = "quicksrnet-small-tiny"  # the shipped weights: the small preset trained on procedural frames


@dataclass(frozen=True)
class QuickSRNetConfig:
    """The shape of a QuickSRNet. The presets are upstream's, for the scale chosen here:

    - small:  32 channels, 2 intermediate layers, no ito (aimet-model-zoo models.py `QuickSRNetSmall`;
      qai-hub-models quicksrnetsmall/model.py NUM_CHANNELS=32, NUM_INTERMEDIATE_LAYERS=2, ito False)
    - medium: 32 channels, 5 intermediate layers, no ito (aimet-model-zoo `QuickSRNetMedium`;
      qai-hub-models quicksrnetmedium/model.py)
    - large:  64 channels, 11 intermediate layers, ito (aimet-model-zoo `QuickSRNetLarge`;
      qai-hub-models quicksrnetlarge/model.py)

    `edge_padding` is ndopt's (see the module doc); `edge_padding=False` is upstream's graph exactly.
    """

    num_channels: int
    num_intermediate_layers: int
    use_ito_connection: bool
    scale: int = 2  # Neodragon upscales 2x; upstream also ships 3x and 4x (1.5x is not supported here)
    in_channels: int = 3
    out_channels: int = 3
    # ndopt's addition (False: upstream's graph exactly): replicate-pad the frame by the receptive radius
    # and crop the output, so borders behave like bicubic's clamped taps instead of seeing the zero
    # padding of every conv, which on 64x64 frames reaches 23% of the pixels (see the module doc)
    edge_padding: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.scale, int) or isinstance(self.scale, bool) or self.scale < 1:
            raise ConfigError(f"QuickSRNetConfig.scale={self.scale!r}: an integer >= 1 (1.5x is not supported)")
        for name in ("num_channels", "in_channels", "out_channels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"QuickSRNetConfig.{name}={getattr(self, name)}: must be positive")
        if self.num_intermediate_layers < 0:
            raise ConfigError(f"QuickSRNetConfig.num_intermediate_layers={self.num_intermediate_layers}: must be >= 0")

    @classmethod
    def small(cls, scale: int = 2) -> QuickSRNetConfig:
        return cls(num_channels=32, num_intermediate_layers=2, use_ito_connection=False, scale=scale)

    @classmethod
    def medium(cls, scale: int = 2) -> QuickSRNetConfig:
        return cls(num_channels=32, num_intermediate_layers=5, use_ito_connection=False, scale=scale)

    @classmethod
    def large(cls, scale: int = 2) -> QuickSRNetConfig:
        return cls(num_channels=64, num_intermediate_layers=11, use_ito_connection=True, scale=scale)

    def to_json(self) -> dict:
        return asdict(self)


PRESETS: dict[str, QuickSRNetConfig] = {
    "quicksrnet-small": QuickSRNetConfig.small(),
    "quicksrnet-medium": QuickSRNetConfig.medium(),
    "quicksrnet-large": QuickSRNetConfig.large(),
}


class QuickSRNet(nn.Module):
    """frames [N, 3, H, W] in [-1, 1] -> [N, 3, sH, sW] in [-1, 1]; see the module doc."""

    def __init__(self, config: QuickSRNetConfig) -> None:
        super().__init__()
        self.config = config
        c, s2 = config.num_channels, config.scale**2
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, c, 3, padding=1), nn.Hardtanh(0.0, 1.0)]
        for _ in range(config.num_intermediate_layers):
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.Hardtanh(0.0, 1.0)]
        self.cnn = nn.Sequential(*layers)
        self.conv_last = nn.Conv2d(c, config.out_channels * s2, 3, padding=1)
        # upstream's AnchorOp: a 1x1 conv that repeats each input channel scale^2 times (trainable in QuickSRNet)
        self.anchor = nn.ModuleDict({"net": nn.Conv2d(config.in_channels, config.in_channels * s2, 1)}) \
            if config.use_ito_connection else None
        self.depth_to_space = nn.PixelShuffle(config.scale)
        self.radius = config.num_intermediate_layers + 2 if config.edge_padding else 0  # 3x3 convs in a row
        self.add_identity_()

    @torch.no_grad()
    def add_identity_(self) -> None:
        """Upstream's initialisation (see the module doc): identity taps on the trunk, nearest
        upsampling in the last conv (no ito) or in the anchor (ito). Adds to the current weights."""
        for conv in self.cnn:
            if isinstance(conv, nn.Conv2d):
                mid = conv.kernel_size[0] // 2
                for i in range(min(conv.in_channels, conv.out_channels)):
                    conv.weight[i, i, mid, mid] += 1.0
        s2 = self.config.scale**2
        if self.anchor is None:
            mid = self.conv_last.kernel_size[0] // 2
            for o in range(self.conv_last.out_channels):
                self.conv_last.weight[o, o // s2, mid, mid] += 1.0
        else:
            net = self.anchor["net"]
            net.weight.zero_()
            net.bias.zero_()
            for o in range(net.out_channels):
                net.weight[o, o // s2, 0, 0] = 1.0

    def forward(self, frames: Tensor) -> Tensor:
        x = frames * 0.5 + 0.5  # the published model works on [0, 1] images
        r = self.radius
        if r:
            x = F.pad(x, (r, r, r, r), mode="replicate")
        y = self.conv_last(self.cnn(x))
        if self.anchor is not None:
            y = y + self.anchor["net"](x)
        y = torch.clamp(y, 0.0, 1.0)  # upstream's clip_output, before depth-to-space (elementwise: same)
        if r:
            y = y[:, :, r:-r, r:-r]  # what the zero padding of the convs reached is cut off
        return self.depth_to_space(y) * 2.0 - 1.0


# ---- baseline and metric ---------------------------------------------------------------------
def bicubic_upsample(frames: Tensor, scale: int = 2) -> Tensor:
    """The baseline: bicubic interpolation (align_corners=False) of [-1, 1] frames, clamped to [-1, 1]."""
    return F.interpolate(frames, scale_factor=scale, mode="bicubic", align_corners=False).clamp(-1.0, 1.0)


def downsample(frames: Tensor, scale: int = 2) -> Tensor:
    """HR [N, 3, H, W] -> LR by area averaging (scale x scale boxes): how training and evaluation
    make the SR input (the procedural renderer's anti-aliasing is box coverage, so the box average
    of a 2x render is what a render at the low resolution draws)."""
    return F.avg_pool2d(frames, scale)


def psnr(a: Tensor, b: Tensor) -> float:
    """Mean over frames of the per-frame PSNR (dB) of [-1, 1] images [N, 3, H, W] (peak-to-peak 2),
    the usual SR figure (a mean of per-image PSNRs)."""
    from ndopt.eval.metrics import pixel_psnr

    return sum(pixel_psnr(a[i : i + 1], b[i : i + 1]) for i in range(a.shape[0])) / a.shape[0]


def clip_frames(video: Tensor) -> Tensor:
    """[3, F, H, W] (a procedural clip) -> its F frames as independent images [F, 3, H, W]."""
    return video.permute(1, 0, 2, 3)


def held_out_frames(clips: int, *, seed: int, size: int = 128, scale: int = 2) -> tuple[Tensor, Tensor]:
    """(lr, hr) frames of `clips` held-out procedural clips (unseen (colour, shape) pairs), rendered at
    `size` x `size` (HR) and area-downsampled by `scale` (LR): [clips * 9, 3, ., .] in [-1, 1]."""
    from ndopt.train.data import ProceduralConfig, ProceduralVideos

    data = ProceduralVideos(ProceduralConfig(height=size, width=size), seed=seed, held_out=True)
    hr = torch.cat([clip_frames(data[i].video) for i in range(clips)])
    return downsample(hr, scale), hr


@torch.no_grad()
def evaluate_sr(net: QuickSRNet, lr: Tensor, hr: Tensor, batch: int = 64) -> dict[str, float]:
    """Mean PSNR (dB) of the net and of bicubic against HR, and the gain of one over the other."""
    dev = next(net.parameters()).device
    sr = torch.cat([net(lr[i : i + batch].to(dev)).cpu() for i in range(0, lr.shape[0], batch)])
    p_sr, p_bic = psnr(sr, hr), psnr(bicubic_upsample(lr, net.config.scale), hr)
    return {"frames": int(lr.shape[0]), "psnr_sr_db": p_sr, "psnr_bicubic_db": p_bic, "gain_db": p_sr - p_bic}


# ---- weights -----------------------------------------------------------------------------------
def sr_weights_path(name: str = TINY_SR) -> Path | None:
    """The shipped weights `weights/<name>.safetensors` in this package, if installed."""
    from ndopt.io import shipped_weights

    return shipped_weights(__package__, f"{name}.safetensors")


def save_weights(path: Path, net: QuickSRNet, metadata: dict[str, str] | None = None) -> Path:
    """The net's state dict as safetensors, written atomically, with its config in the metadata."""
    import json

    from safetensors.torch import save_file

    from ndopt.io import atomic_path

    meta = {"config": json.dumps(net.config.to_json()), **(metadata or {})}
    sd = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(Path(path)) as tmp:
        save_file(sd, str(tmp), metadata=meta)
    return Path(path)


def load_weights(path: Path, config: QuickSRNetConfig, device: torch.device | str = "cpu") -> QuickSRNet:
    """A QuickSRNet of `config` with the weights at `path` (safetensors); names, shapes and dtypes
    are checked (missing or extra keys raise CheckpointError listing them). Returns it in eval mode."""
    from safetensors.torch import load_file

    from ndopt.frontends.pyramid_flow.checkpoint import load_into

    try:
        sd = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt or missing files
        raise CheckpointError(f"{path}: cannot read QuickSRNet weights ({e})") from None
    net = QuickSRNet(config)
    load_into(net, sd, source=str(path))
    return net.to(device).eval().requires_grad_(False)


def load_tiny_sr(device: torch.device | str = "cpu") -> QuickSRNet:
    """The shipped QuickSRNet-small 2x, trained on ndopt's procedural frames (64x64 -> 128x128)."""
    path = sr_weights_path()
    if path is None:
        raise CheckpointError(f"no shipped {TINY_SR}.safetensors in ndopt/frontends/neodragon/weights: train it "
                              "with `python -m ndopt.frontends.neodragon.train_sr --out runs/sr --install`")
    return load_weights(path, PRESETS["quicksrnet-small"], device)


def num_parameters(config: QuickSRNetConfig) -> int:
    """Parameters of a QuickSRNet (built on the meta device)."""
    with torch.device("meta"):
        return sum(p.numel() for p in QuickSRNet(config).parameters())


def macs(config: QuickSRNetConfig, height: int, width: int) -> int:
    """Multiply-accumulates of one frame at LR size (height, width), counted by FlopCounterMode on
    the meta device (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = QuickSRNet(config)
        x = torch.empty(1, config.in_channels, height, width)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x)
    return math.ceil(counter.get_total_flops() / 2)


__all__ = [
    "PRESETS",
    "TINY_SR",
    "QuickSRNet",
    "QuickSRNetConfig",
    "bicubic_upsample",
    "clip_frames",
    "downsample",
    "evaluate_sr",
    "held_out_frames",
    "load_tiny_sr",
    "load_weights",
    "macs",
    "num_parameters",
    "psnr",
    "save_weights",
    "sr_weights_path",
]
