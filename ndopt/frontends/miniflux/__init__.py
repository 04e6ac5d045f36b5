"""The Pyramid-Flow miniFLUX frontend: the FLUX-style DiT, CLIP-L + T5 text encoder, presets, checkpoints.

Upstream's recommended variant (`pyramid_dit/flux_modules/`): 8 double-stream + 16 single-stream
blocks over 2x2-packed latents with 3-axis RoPE. The causal VAE, the schedule and the pyramidal
sampler are the SD3 variant's (`ndopt.frontends.pyramid_flow`), reused as they are. Passes reach it
through the model interface (`interface.py`, entry point `pyramid-flow-miniflux`).
"""
