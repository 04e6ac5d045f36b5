"""Fidelity metrics and the probe that compares a pipeline's output with a reference's."""

from ndopt.eval.metrics import latent_metrics, psnr
from ndopt.eval.probe import FidelityProbe, ProbeOutput, ProbeSettings

__all__ = ["FidelityProbe", "ProbeOutput", "ProbeSettings", "latent_metrics", "psnr"]
