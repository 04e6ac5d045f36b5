"""Calibrating the estimator on Qualcomm AI Hub's published measurements.

`targets/calibration.tsv` lists at most 12 models with their measured latencies per AI Hub device
and precision (from the `perf.yaml` files of the `qai-hub-models` package; the `source` column
says which file and runtime). Each model is rebuilt here from its public architecture (torchvision,
transformers, diffusers configs) on the meta device, costed node by node by the same front end
that `ndopt plan` uses (`estimator.module_graph_cost`), and `fit` finds the per-class efficiencies
of a target and precision that minimize the squared log error. The fitted values live in the
target files (`efficiency:`); `bench/bench_estimator.py` refits, prints the errors (calibration
and held-out models) and the YAML to paste. The estimator itself never sees a model name.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

from ndopt.errors import TargetError
from targets import Efficiency, TargetSpec
from targets.estimator import GraphCost, estimate_graph
from targets.torch_costs import module_graph_cost

MAX_MODELS = 12
COLUMNS = ("model", "builder", "device", "precision", "latency_ms", "source")


@dataclass(frozen=True)
class Measurement:
    model: str
    builder: str
    device: str
    precision: str
    latency_ms: float
    source: str


def read_tsv(text: str | None = None, source: str = "targets/calibration.tsv") -> list[Measurement]:
    """The calibration table (comment lines start with #)."""
    if text is None:
        text = (resources.files("targets") / "calibration.tsv").read_text()
    rows = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    reader = csv.DictReader(rows, delimiter="\t")
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise TargetError(f"{source}: header must be {' '.join(COLUMNS)} (tab-separated), got {reader.fieldnames}")
    out = []
    for i, r in enumerate(reader, start=2):
        try:
            out.append(Measurement(r["model"], r["builder"], r["device"], r["precision"], float(r["latency_ms"]),
                                   r["source"]))
        except (TypeError, ValueError) as e:
            raise TargetError(f"{source}: data row {i}: {e}; latency_ms must be a number") from None
    models = {m.model for m in out}
    if len(models) > MAX_MODELS:
        raise TargetError(f"{source}: {len(models)} models; calibrate on at most {MAX_MODELS}")
    return out


# ---- the calibration models, rebuilt on the meta device ---------------------------------------------
Built = tuple[Any, tuple, dict]


def _meta() -> Any:
    import torch

    return torch.device("meta")


def _tv(name: str, shape: tuple[int, ...], video: bool = False) -> Callable[[], Built]:
    def build() -> Built:
        import torch
        import torchvision.models as tvm

        with _meta():
            m = getattr(tvm.video if video else tvm, name)(weights=None).eval()
        return m, (torch.empty(shape, device="meta"),), {}

    return build


def _bert(kind: str, seq: int = 384) -> Callable[[], Built]:
    def build() -> Built:
        import torch
        import transformers as tf

        cls, cfg = {"bert": (tf.BertForMaskedLM, tf.BertConfig), "distilbert": (tf.DistilBertForMaskedLM,
                                                                                   tf.DistilBertConfig)}[kind]
        with _meta():
            m = cls(cfg()).eval()
        ids = torch.zeros(1, seq, dtype=torch.long, device="meta")
        return m, (), {"input_ids": ids, "attention_mask": torch.ones(1, seq, dtype=torch.long, device="meta")}

    return build


def _clip_text() -> Built:
    import torch
    import transformers as tf

    cfg = tf.CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
    with _meta():
        m = tf.CLIPTextModel(cfg).eval()
    return m, (torch.zeros(1, 77, dtype=torch.long, device="meta"),), {}


class _WhisperEncoderKV:
    """Whisper's encoder plus the cross-attention K/V projections of every decoder layer (what
    AI Hub's Whisper encoder graph returns)."""

    @staticmethod
    def build(d: int, layers: int, heads: int, ffn: int, dec_layers: int) -> Built:
        import torch
        import transformers as tf
        from torch import nn

        class EncoderKV(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                cfg = tf.WhisperConfig(d_model=d, encoder_layers=layers, encoder_attention_heads=heads,
                                       encoder_ffn_dim=ffn, decoder_layers=dec_layers, num_mel_bins=80)
                self.encoder = tf.models.whisper.modeling_whisper.WhisperEncoder(cfg)
                self.k = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(dec_layers))
                self.v = nn.ModuleList(nn.Linear(d, d) for _ in range(dec_layers))

            def forward(self, x: Any) -> Any:
                h = self.encoder(x).last_hidden_state
                return [k(h) for k in self.k] + [v(h) for v in self.v]

        with _meta():
            m = EncoderKV().eval()
        return m, (torch.empty(1, 80, 3000, device="meta"),), {}


def _beit() -> Built:
    import torch
    import transformers as tf

    cfg = tf.BeitConfig(num_labels=1000, use_relative_position_bias=True, use_mean_pooling=True)  # beit-base-patch16-224
    with _meta():
        m = tf.BeitForImageClassification(cfg).eval()
    return m, (torch.empty(1, 3, 224, 224, device="meta"),), {}


def _unet(version: str) -> Built:
    import torch
    from diffusers import UNet2DConditionModel

    extra = {"cross_attention_dim": 768, "attention_head_dim": 8} if version == "1.5" else \
        {"cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True}
    with _meta():
        m = UNet2DConditionModel(sample_size=64, **extra).eval()
    ctx = torch.empty(1, 77, extra["cross_attention_dim"], device="meta")
    return m, (torch.empty(1, 4, 64, 64, device="meta"), torch.empty(1, device="meta"), ctx), {}


def _sd_vae_decoder() -> Built:
    import torch
    from diffusers import AutoencoderKL
    from torch import nn

    class Decoder(nn.Module):  # AI Hub's "vae" graph: post_quant_conv + decoder (no encoder weights)
        def __init__(self, vae: Any) -> None:
            super().__init__()
            self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

        def forward(self, z: Any) -> Any:
            return self.decoder(self.post_quant_conv(z))

    with _meta():
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
        m = Decoder(vae).eval()
    return m, (torch.empty(1, 4, 64, 64, device="meta"),), {}


BUILDERS: dict[str, Callable[[], Built]] = {
    "diffusers:sd15_unet": lambda: _unet("1.5"),
    "diffusers:sd21_unet": lambda: _unet("2.1"),
    "diffusers:sd_vae_decoder": _sd_vae_decoder,
    "transformers:clip_l_text": _clip_text,
    "transformers:bert_base_mlm": _bert("bert"),
    "transformers:distilbert_base_mlm": _bert("distilbert"),
    "transformers:whisper_small_encoder": lambda: _WhisperEncoderKV.build(768, 12, 12, 3072, 12),
    "transformers:whisper_medium_encoder": lambda: _WhisperEncoderKV.build(1024, 24, 16, 4096, 24),
    "transformers:beit_base": _beit,
    "torchvision:vit_b_16": _tv("vit_b_16", (1, 3, 224, 224)),
    "torchvision:convnext_tiny": _tv("convnext_tiny", (1, 3, 224, 224)),
    "torchvision:mobilenet_v2": _tv("mobilenet_v2", (1, 3, 224, 224)),
    "torchvision:efficientnet_v2_s": _tv("efficientnet_v2_s", (1, 3, 224, 224)),
    "torchvision:swin_t": _tv("swin_t", (1, 3, 224, 224)),
    "torchvision:mc3_18": _tv("mc3_18", (1, 3, 16, 112, 112), video=True),
}


def graph_cost(builder: str) -> GraphCost:
    """Build a calibration model on meta and cost it (fake tensors when the model needs values)."""
    if builder not in BUILDERS:
        raise TargetError(f"calibration builder {builder!r} is unknown; known: {', '.join(sorted(BUILDERS))}")
    module, args, kwargs = BUILDERS[builder]()
    try:
        return module_graph_cost(module, *args, **kwargs)
    except (RuntimeError, NotImplementedError):  # a model reads tensor values (.item()): fake tensors
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True):
            return module_graph_cost(module, *args, **kwargs)


# ---- the fit --------------------------------------------------------------------------------------------
PARAMS = ("conv", "matmul", "attention", "weights", "activations", "node_us")
BOUNDS = {"conv": (0.02, 1.0), "matmul": (0.02, 1.0), "attention": (0.005, 1.0), "weights": (0.05, 1.0),
          "activations": (0.05, 20.0), "node_us": (0.0, 40.0)}


def _efficiency(x: Sequence[float]) -> Efficiency:
    vals = dict(zip(PARAMS, x))
    return Efficiency(**vals)


def predict(costs: Sequence[GraphCost], spec: TargetSpec, precision: str, eff: Efficiency) -> np.ndarray:
    return np.array([estimate_graph(c, spec, precision, eff).latency_ms for c in costs])


def fit(costs: Sequence[GraphCost], measured_ms: Sequence[float], spec: TargetSpec, precision: str,
        start: Efficiency | None = None) -> Efficiency:
    """The efficiencies minimizing sum (log predicted - log measured)^2 over the models (bounded;
    scipy's least_squares, a dev-time dependency: the fitted values ship in the target files)."""
    from scipy.optimize import least_squares

    if len(costs) != len(measured_ms) or not costs:
        raise TargetError("fit needs one measured latency per costed model, and at least one model")
    meas = np.log(np.asarray(measured_ms, dtype=float))
    lo = np.array([BOUNDS[p][0] for p in PARAMS])
    hi = np.array([BOUNDS[p][1] for p in PARAMS])
    x0 = np.array([getattr(start, p) for p in PARAMS]) if start else np.array([0.3, 0.3, 0.1, 0.5, 2.0, 5.0])
    x0 = np.clip(x0, lo + 1e-6, hi - 1e-6)

    def residuals(x: np.ndarray) -> np.ndarray:
        return np.log(predict(costs, spec, precision, _efficiency(x))) - meas

    best = least_squares(residuals, x0, bounds=(lo, hi), x_scale="jac", diff_step=1e-3)
    for guess in ([0.5, 0.5, 0.2, 0.8, 5.0, 2.0], [0.15, 0.15, 0.05, 0.3, 1.0, 10.0]):  # a few starts: max() is not smooth
        r = least_squares(residuals, np.clip(guess, lo + 1e-6, hi - 1e-6), bounds=(lo, hi), x_scale="jac",
                          diff_step=1e-3)
        if r.cost < best.cost:
            best = r
    return _efficiency([float(f"{v:.4g}") for v in best.x])


def errors(pred: Sequence[float], meas: Sequence[float]) -> dict[str, float]:
    """Median and worst |predicted / measured - 1|."""
    rel = np.abs(np.asarray(pred) / np.asarray(meas) - 1)
    return {"median": float(np.median(rel)), "worst": float(rel.max()), "n": len(rel),
            "geomean_ratio": float(math.exp(np.mean(np.log(np.asarray(pred) / np.asarray(meas)))))}
