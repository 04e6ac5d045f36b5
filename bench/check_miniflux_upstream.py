"""Check: ndopt's miniFLUX DiT against upstream's own `PyramidFluxTransformer` (prints figures).

    .venv/bin/python bench/check_miniflux_upstream.py [--mirror DIR]

Takes `pyramid_dit/` out of a local git mirror of jy0205/Pyramid-Flow (`git archive HEAD`) into a
temporary directory and imports its `flux_modules` with a stub `trainer_misc` (sequence parallelism
off: what single-GPU inference sees). Then:

1. upstream's DiT at the released miniFLUX config on the meta device: parameters, state-dict keys and
   shapes, against ndopt's `PyramidFluxDiT` (the figure tests/frontends/test_miniflux_dit.py pins);
2. the text encoders from their transformers configs on meta (CLIP-L `CLIPTextModel`, T5-XXL encoder);
3. with `einops` importable (upstream's forward needs it; `pip install einops`), a small upstream DiT
   with ndopt's seeded weights loaded strictly, run by upstream's own forward on the CPU against
   ndopt's on first-frame and history layouts with padded text: the largest difference.

Without the mirror it says so and exits 0.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import torch

MIRROR = Path("/work/.mirror/jy0205+Pyramid-Flow/repo")
RELEASED = {"patch_size": 1, "in_channels": 64, "num_layers": 8, "num_single_layers": 16, "attention_head_dim": 64,
            "num_attention_heads": 30, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
            "axes_dims_rope": [16, 24, 24], "use_flash_attn": False, "use_temporal_causal": True,
            "interp_condition_pos": True}


def import_upstream(mirror: Path, into: Path) -> tuple[types.ModuleType, bool]:
    """upstream's `flux_modules` package, and whether its forward can run (einops present)."""
    archive = subprocess.run(["git", "-C", str(mirror), "archive", "HEAD", "pyramid_dit"], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    misc = types.ModuleType("trainer_misc")
    misc.is_sequence_parallel_initialized = lambda: False
    for name in ("get_sequence_parallel_group", "get_sequence_parallel_world_size", "get_sequence_parallel_rank",
                 "get_sequence_parallel_group_rank", "all_to_all"):
        setattr(misc, name, None)  # only reached with sequence parallelism on
    sys.modules["trainer_misc"] = misc
    try:
        import einops  # noqa: F401
        runnable = True
    except ImportError:  # imported at module level upstream, used only in forward
        stub = types.ModuleType("einops")
        stub.rearrange = None
        sys.modules["einops"] = stub
        runnable = False
    sys.path.insert(0, str(into / "pyramid_dit"))
    import flux_modules

    return flux_modules, runnable


def numel(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def compare_sizes(upstream: types.ModuleType) -> None:
    from ndopt.frontends.miniflux.dit import FluxDiTConfig, PyramidFluxDiT
    from ndopt.frontends.miniflux.text import MiniFluxTextEncoder, real_config

    with torch.device("meta"):
        ref = upstream.PyramidFluxTransformer(**RELEASED)
        ours = PyramidFluxDiT(FluxDiTConfig.from_dict(dict(RELEASED)))
        text = MiniFluxTextEncoder(real_config())
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    print(f"upstream PyramidFluxTransformer (released config, meta): {numel(ref):,} params, {len(ref_sd)} keys")
    print(f"ndopt PyramidFluxDiT:                                     {numel(ours):,} params, {len(our_sd)} keys")
    print(f"  per double-stream block {numel(ref.transformer_blocks[0]):,} (ndopt {numel(ours.transformer_blocks[0]):,}),"
          f" per single-stream block {numel(ref.single_transformer_blocks[0]):,} "
          f"(ndopt {numel(ours.single_transformer_blocks[0]):,})")
    shapes = [k for k in ref_sd if k in our_sd and ref_sd[k].shape != our_sd[k].shape]
    print(f"  keys only upstream: {sorted(set(ref_sd) - set(our_sd)) or 'none'}; only ndopt: "
          f"{sorted(set(our_sd) - set(ref_sd)) or 'none'}; shape mismatches: {shapes or 'none'}; "
          f"same key order: {list(ref_sd) == list(our_sd)}")
    clip, t5 = numel(text.text_encoder), numel(text.text_encoder_2)
    print(f"text encoders (transformers configs, meta): CLIP-L CLIPTextModel {clip:,}, T5-XXL encoder {t5:,}, "
          f"total {clip + t5:,}")


def compare_outputs(upstream: types.ModuleType) -> None:
    from ndopt.frontends.miniflux.dit import FluxDiTConfig, PyramidFluxDiT
    from ndopt.frontends.pyramid_flow.dit import randomize_

    small = {**RELEASED, "num_layers": 2, "num_single_layers": 2, "num_attention_heads": 2, "joint_attention_dim": 32,
             "pooled_projection_dim": 24}
    torch.manual_seed(0)
    ours = randomize_(PyramidFluxDiT(FluxDiTConfig.from_dict(dict(small))), torch.Generator().manual_seed(0)).eval()
    ref = upstream.PyramidFluxTransformer(**small).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    layouts = [((1, 8, 8),), ((1, 4, 4), (1, 8, 8), (1, 8, 8)), ((2, 4, 6), (1, 8, 12), (2, 8, 12))]
    worst = 0.0
    for clips in layouts:
        sample = [torch.randn(2, 16, *c, generator=g) for c in clips]
        ehs = torch.randn(2, 9, small["joint_attention_dim"], generator=g)
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[0, 6:] = 0  # a CFG-like batch: the rows padded differently
        pooled = torch.randn(2, small["pooled_projection_dim"], generator=g)
        t = torch.tensor([900.0, 250.0])
        with torch.no_grad():
            a = ours(sample, ehs, mask, pooled, t)
            b = ref(sample=[sample], encoder_hidden_states=ehs, encoder_attention_mask=mask,
                    pooled_projections=pooled, timestep_ratio=t)[0]
        diff = (a - b).abs().max().item()
        worst = max(worst, diff)
        print(f"  clips {clips}: output {tuple(a.shape)}, mean |v| {a.abs().mean():.3f}, max |ndopt - upstream| {diff:.2e}")
    print(f"outputs vs upstream's forward (copied weights, CPU float32): worst max-abs difference {worst:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mirror", type=Path, default=MIRROR, help="a git clone of jy0205/Pyramid-Flow")
    args = ap.parse_args()
    if not (args.mirror / "HEAD").exists() and not (args.mirror / ".git").exists():
        print(f"skipped: no git mirror of jy0205/Pyramid-Flow at {args.mirror} (pass --mirror DIR)")
        return
    with tempfile.TemporaryDirectory(prefix="upflux") as tmp:
        upstream, runnable = import_upstream(args.mirror, Path(tmp))
        compare_sizes(upstream)
        if runnable:
            compare_outputs(upstream)
        else:
            print("outputs: skipped (upstream's forward needs einops: pip install einops)")


if __name__ == "__main__":
    main()
