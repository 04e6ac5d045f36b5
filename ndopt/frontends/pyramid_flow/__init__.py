"""The Pyramid-Flow (SD3 MMDiT) frontend: DiT, causal video VAE, text encoders, sampler, presets."""
