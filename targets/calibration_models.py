"""The calibration models: public architectures rebuilt with random weights at AI Hub's input shapes.

Each builder takes a torch device (meta to cost shapes only, cpu to export ONNX) and returns
`(module, args, kwargs)`. Configs are written out in code (no download: random weights are all a
latency model needs). `FAMILIES` groups them for leave-one-family-out cross-validation: a family is
what an unseen model is most likely to resemble (a held-out family tests a new kind of graph).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Built = tuple[Any, tuple, dict]
Builder = Callable[[Any], Built]


def _img(device: Any, *shape: int) -> Any:
    import torch

    return torch.zeros(shape, device=device)


def _tv(name: str, shape: tuple[int, ...], sub: str = "", **kw: Any) -> Builder:
    """A torchvision model (`sub`: its submodule, video or segmentation)."""

    def build(device: Any) -> Built:
        import torch
        import torchvision.models as tvm

        ns = getattr(tvm, sub) if sub else tvm
        with torch.device(device):
            m = getattr(ns, name)(weights=None, **kw).eval()
        if sub == "segmentation":
            m = _OutKey(m, "out")
        return m, (_img(device, *shape),), {}

    return build


def _OutKey(m: Any, key: str) -> Any:
    """A module returning one entry of its inner model's dict output (AI Hub exports that tensor)."""
    from torch import nn

    class OutKey(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = m

        def forward(self, *a: Any, **k: Any) -> Any:
            out = self.inner(*a, **k)
            return out[key] if isinstance(out, dict) else getattr(out, key)

    return OutKey().eval()


def _text(kind: str, seq: int, **cfg: Any) -> Builder:
    """A masked-LM encoder over `seq` tokens with an attention mask (AI Hub's BERT template)."""

    def build(device: Any) -> Built:
        import torch
        import transformers as tf

        cls, conf = {"bert": (tf.BertForMaskedLM, tf.BertConfig),
                     "distilbert": (tf.DistilBertForMaskedLM, tf.DistilBertConfig),
                     "albert": (tf.AlbertForMaskedLM, tf.AlbertConfig),
                     "electra": (tf.ElectraForPreTraining, tf.ElectraConfig),
                     "mobilebert": (tf.MobileBertForMaskedLM, tf.MobileBertConfig)}[kind]
        with torch.device(device):
            m = _OutKey(cls(conf(**cfg)).eval(), "logits")
        ids = torch.zeros(1, seq, dtype=torch.long, device=device)
        return m, (ids, torch.ones(1, seq, dtype=torch.long, device=device)), {}

    return build


def _clip_text(hidden: int, layers: int, heads: int, ffn: int, act: str) -> Builder:
    def build(device: Any) -> Built:
        import torch
        import transformers as tf

        cfg = tf.CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                                num_attention_heads=heads, max_position_embeddings=77, hidden_act=act)
        with torch.device(device):
            m = _OutKey(tf.CLIPTextModel(cfg).eval(), "last_hidden_state")
        return m, (torch.zeros(1, 77, dtype=torch.long, device=device),), {}

    return build


def _whisper_encoder(d: int, layers: int, heads: int, ffn: int) -> Builder:
    """Whisper's encoder plus the cross-attention K/V projections of every decoder layer (what
    AI Hub's Whisper encoder graph returns); as many decoder layers as encoder layers."""

    def build(device: Any) -> Built:
        import torch
        import transformers as tf
        from torch import nn

        class EncoderKV(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                cfg = tf.WhisperConfig(d_model=d, encoder_layers=layers, encoder_attention_heads=heads,
                                       encoder_ffn_dim=ffn, decoder_layers=layers, num_mel_bins=80)
                self.encoder = tf.models.whisper.modeling_whisper.WhisperEncoder(cfg)
                self.k = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(layers))
                self.v = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))

            def forward(self, x: Any) -> Any:
                h = self.encoder(x).last_hidden_state
                return tuple(k(h) for k in self.k) + tuple(v(h) for v in self.v)

        with torch.device(device):
            m = EncoderKV().eval()
        return m, (_img(device, 1, 80, 3000),), {}

    return build


def _hf_image(cls_name: str, conf_name: str, size: int | tuple[int, int], key: str = "logits", **cfg: Any) -> Builder:
    def build(device: Any) -> Built:
        import torch
        import transformers as tf

        h, w = (size, size) if isinstance(size, int) else size
        with torch.device(device):
            m = _OutKey(getattr(tf, cls_name)(getattr(tf, conf_name)(**cfg)).eval(), key)
        return m, (_img(device, 1, 3, h, w),), {}

    return build


def _detr(kind: str, depth: int) -> Builder:
    """DETR with a ResNet backbone (transformers' own, not timm) at 640x640: logits and boxes."""

    def build(device: Any) -> Built:
        import torch
        import transformers as tf
        from torch import nn

        backbone = tf.ResNetConfig(depths=[3, 4, 6, 3] if depth == 50 else [3, 4, 23, 3], layer_type="bottleneck",
                                   hidden_sizes=[256, 512, 1024, 2048], out_features=["stage4"])
        cls, conf = (tf.DetrForObjectDetection, tf.DetrConfig) if kind == "detr" else \
            (tf.ConditionalDetrForObjectDetection, tf.ConditionalDetrConfig)
        cfg = conf(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, backbone=None)

        class Detr(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = cls(cfg)

            def forward(self, x: Any) -> Any:
                out = self.model(pixel_values=x)
                return out.logits, out.pred_boxes

        with torch.device(device):
            m = Detr().eval()
        return m, (_img(device, 1, 3, 640, 640),), {}

    return build


def _unet(version: str) -> Builder:
    def build(device: Any) -> Built:
        import torch
        from diffusers import UNet2DConditionModel

        extra = {"cross_attention_dim": 768, "attention_head_dim": 8} if version == "1.5" else \
            {"cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True}
        with torch.device(device):
            m = _OutKey(UNet2DConditionModel(sample_size=64, **extra).eval(), "sample")
        ctx = torch.zeros(1, 77, extra["cross_attention_dim"], device=device)
        return m, (_img(device, 1, 4, 64, 64), torch.ones(1, device=device), ctx), {}

    return build


def _sd_vae_decoder(device: Any) -> Built:
    import torch
    from diffusers import AutoencoderKL
    from torch import nn

    class Decoder(nn.Module):  # AI Hub's "vae" graph: post_quant_conv + decoder (no encoder weights)
        def __init__(self, vae: Any) -> None:
            super().__init__()
            self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

        def forward(self, z: Any) -> Any:
            return self.decoder(self.post_quant_conv(z))

    with torch.device(device):
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
        m = Decoder(vae).eval()
    return m, (_img(device, 1, 4, 64, 64),), {}


def _depth_anything(device: Any) -> Built:
    """Depth-Anything-small: a DINOv2-S backbone and a DPT head at 518x518."""
    import torch
    import transformers as tf

    backbone = tf.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518,
                               patch_size=14, out_features=["stage3", "stage6", "stage9", "stage12"],
                               reshape_hidden_states=False)
    cfg = tf.DepthAnythingConfig(backbone_config=backbone, fusion_hidden_size=64, neck_hidden_sizes=[48, 96, 192, 384])
    with torch.device(device):
        m = _OutKey(tf.DepthAnythingForDepthEstimation(cfg).eval(), "predicted_depth")
    return m, (_img(device, 1, 3, 518, 518),), {}


I224 = (1, 3, 224, 224)
V16 = (1, 3, 16, 112, 112)

# builder name -> (family, builder). Families: what leave-one-family-out cross-validation holds out.
MODELS: dict[str, tuple[str, Builder]] = {
    "torchvision:resnet18": ("resnet", _tv("resnet18", I224)),
    "torchvision:resnet50": ("resnet", _tv("resnet50", I224)),
    "torchvision:resnet101": ("resnet", _tv("resnet101", I224)),
    "torchvision:resnext50_32x4d": ("resnet", _tv("resnext50_32x4d", I224)),
    "torchvision:resnext101_32x8d": ("resnet", _tv("resnext101_32x8d", I224)),
    "torchvision:wide_resnet50_2": ("resnet", _tv("wide_resnet50_2", I224)),
    "torchvision:squeezenet1_1": ("plain_cnn", _tv("squeezenet1_1", I224)),
    "torchvision:regnet_x_3_2gf": ("plain_cnn", _tv("regnet_x_3_2gf", I224)),
    "torchvision:regnet_y_800mf": ("plain_cnn", _tv("regnet_y_800mf", I224)),
    "torchvision:densenet121": ("concat_cnn", _tv("densenet121", I224)),
    "torchvision:googlenet": ("concat_cnn", _tv("googlenet", I224, aux_logits=False, init_weights=False)),
    "torchvision:inception_v3": ("concat_cnn", _tv("inception_v3", (1, 3, 299, 299), aux_logits=False,
                                                   init_weights=False)),
    "torchvision:mobilenet_v2": ("depthwise_cnn", _tv("mobilenet_v2", I224)),
    "torchvision:mobilenet_v3_large": ("depthwise_cnn", _tv("mobilenet_v3_large", I224)),
    "torchvision:mobilenet_v3_small": ("depthwise_cnn", _tv("mobilenet_v3_small", I224)),
    "torchvision:mnasnet0_5": ("depthwise_cnn", _tv("mnasnet0_5", I224)),
    "torchvision:shufflenet_v2_x1_0": ("depthwise_cnn", _tv("shufflenet_v2_x1_0", I224)),
    "torchvision:efficientnet_b0": ("efficientnet", _tv("efficientnet_b0", I224)),
    "torchvision:efficientnet_b4": ("efficientnet", _tv("efficientnet_b4", (1, 3, 380, 380))),
    "torchvision:efficientnet_v2_s": ("efficientnet", _tv("efficientnet_v2_s", I224)),
    "torchvision:convnext_tiny": ("convnext", _tv("convnext_tiny", I224)),
    "torchvision:convnext_base": ("convnext", _tv("convnext_base", I224)),
    "torchvision:mc3_18": ("video_cnn", _tv("mc3_18", V16, sub="video")),
    "torchvision:r3d_18": ("video_cnn", _tv("r3d_18", V16, sub="video")),
    "torchvision:r2plus1d_18": ("video_cnn", _tv("r2plus1d_18", V16, sub="video")),
    "torchvision:vit_b_16": ("vit", _tv("vit_b_16", I224)),
    "transformers:beit_base": ("vit", _hf_image("BeitForImageClassification", "BeitConfig", 224, num_labels=1000,
                                                use_relative_position_bias=True, use_mean_pooling=True)),
    "transformers:levit_128s": ("vit", _hf_image("LevitForImageClassification", "LevitConfig", 224)),
    "transformers:mobilevit_s": ("vit", _hf_image("MobileViTForImageClassification", "MobileViTConfig", 256)),
    "torchvision:swin_t": ("swin", _tv("swin_t", I224)),
    "torchvision:swin_s": ("swin", _tv("swin_s", I224)),
    "torchvision:swin_b": ("swin", _tv("swin_b", I224)),
    "transformers:bert_base_mlm": ("bert", _text("bert", 384)),
    "transformers:distilbert_base_mlm": ("bert", _text("distilbert", 384)),
    "transformers:albert_base_v2_mlm": ("bert", _text("albert", 384, hidden_act="gelu_new")),
    "transformers:electra_base_discriminator": ("bert", _text("electra", 384, embedding_size=768, hidden_size=768,
                                                              num_attention_heads=12, intermediate_size=3072)),
    "transformers:mobilebert_mlm": ("bert", _text("mobilebert", 384)),
    "transformers:segformer_b0_512": ("dense_prediction", _hf_image(
        "SegformerForSemanticSegmentation", "SegformerConfig", 512, num_labels=150)),
    "torchvision:fcn_resnet50_520": ("dense_prediction", _tv("fcn_resnet50", (1, 3, 520, 520), sub="segmentation",
                                                             weights_backbone=None, aux_loss=False)),
    "transformers:depth_anything_small": ("dense_prediction", _depth_anything),
    "diffusers:sd15_unet": ("diffusion", _unet("1.5")),
    "diffusers:sd21_unet": ("diffusion", _unet("2.1")),
    "diffusers:sd_vae_decoder": ("diffusion", _sd_vae_decoder),
    "transformers:clip_l_text": ("clip_text", _clip_text(768, 12, 12, 3072, "quick_gelu")),
    "transformers:openclip_h_text": ("clip_text", _clip_text(1024, 23, 16, 4096, "gelu")),
    "transformers:whisper_tiny_encoder": ("whisper", _whisper_encoder(384, 4, 6, 1536)),
    "transformers:whisper_base_encoder": ("whisper", _whisper_encoder(512, 6, 8, 2048)),
    "transformers:whisper_small_encoder": ("whisper", _whisper_encoder(768, 12, 12, 3072)),
    "transformers:whisper_medium_encoder": ("whisper", _whisper_encoder(1024, 24, 16, 4096)),
    "transformers:detr_resnet50": ("detection", _detr("detr", 50)),
    "transformers:detr_resnet101": ("detection", _detr("detr", 101)),
    "transformers:conditional_detr_resnet50": ("detection", _detr("conditional", 50)),
}

BUILDERS: dict[str, Builder] = {name: b for name, (_, b) in MODELS.items()}
FAMILIES: dict[str, str] = {name: fam for name, (fam, _) in MODELS.items()}
