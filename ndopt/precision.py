"""Precisions and weight sizes: the one table of bits per precision, the one count of a module's bytes.

A precision is named as the NPU runs it, `w<weight bits>a<activation bits>` (fp16: both 16-bit
float). Target files list the ones a chip supports, the quantization pass records the one it
calibrated, and the estimator prices tensors at its widths; all of them read `PRECISION_BITS`.
`weight_bytes` is what a module's tensors take at their own dtypes (a float pipeline's size, the
threads policy's sense of how big a piece of work is, the 2 GB ONNX external-data threshold).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from torch import nn

PrecisionName = Literal["fp16", "w8a16", "w8a8", "w4a16", "w4a8"]

# (weight bits, activation bits) of each precision
PRECISION_BITS: dict[str, tuple[int, int]] = {
    "fp16": (16, 16), "w8a16": (8, 16), "w8a8": (8, 8), "w4a16": (4, 16), "w4a8": (4, 8),
}


def weight_bits(precision: str) -> int:
    return PRECISION_BITS[precision][0]


def activation_bits(precision: str) -> int:
    return PRECISION_BITS[precision][1]


def weight_bytes(module: nn.Module, *, buffers: bool = True, skip_meta: bool = False) -> int:
    """Bytes of a module's parameters (and, with `buffers`, its buffers: RoPE tables, norm statistics)
    at their own dtypes. A meta module counts what it would hold; `skip_meta` counts only tensors that
    hold memory (a half-materialized pipeline's real size)."""
    tensors = [*module.parameters(), *(module.buffers() if buffers else ())]
    return sum(t.numel() * t.element_size() for t in tensors if not (skip_meta and t.device.type == "meta"))


__all__ = ["PRECISION_BITS", "PrecisionName", "activation_bits", "weight_bits", "weight_bytes"]
