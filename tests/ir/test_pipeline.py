"""The IR: summary text, replace semantics, verifier errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from golden import check_golden

from ndopt.errors import VerificationError
from ndopt.ir import Port, TensorSpec, verify
from ndopt.ir.verify import verify_calls, verify_structure


def test_tiny_summary_golden(tiny):
    check_golden("tiny_pipeline.txt", tiny.summary())


def test_tiny_verifies(tiny):
    verify(tiny)


def test_replace_shares_unchanged_components_and_leaves_input_alone(tiny):
    before = tiny.summary()
    dec = tiny["vae_decoder"]
    new = tiny.replace(vae_decoder=dec.with_attrs(note="x"), remove=["vae_encoder"])
    assert new["dit"] is tiny["dit"] and new["text_encoder"] is tiny["text_encoder"]
    assert "vae_encoder" not in new.components and "vae_encoder" not in new.graph
    assert "vae_encoder" in tiny.components and tiny.summary() == before


def test_edge_type_mismatch_is_caught(tiny):
    dec = tiny["vae_decoder"]
    bad = replace(dec, inputs=(Port("z", TensorSpec(("B", 4, "t", "h", "w"))),))
    with pytest.raises(VerificationError, match=r"dit\.latents is float32\[B, 16, t, h, w\] but vae_decoder\.z expects"):
        verify_structure(tiny.replace(vae_decoder=bad))


def test_cycle_and_missing_producer_are_caught(tiny):
    g = tiny.graph.copy()
    g.add_edge("vae_decoder", "text_encoder", ports=())
    with pytest.raises(VerificationError, match="cycle"):
        verify_structure(tiny.replace(graph=g))
    g = tiny.graph.copy()
    g.remove_edge("text_encoder", "dit")
    with pytest.raises(VerificationError, match="required input 'encoder_hidden_states' has no producer"):
        verify_structure(tiny.replace(graph=g))


def test_video_unreachable_is_caught(tiny):
    g = tiny.graph.copy()
    g.remove_edge("dit", "vae_decoder")
    with pytest.raises(VerificationError, match="no path to the video|not reachable"):
        verify_structure(tiny.replace(graph=g))


class _WrongChannels(torch.nn.Module):
    """A decoder whose ports claim 16 latent channels but whose conv wants 4."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(4, 3, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv(z)


def test_meta_forward_catches_a_decoder_with_the_wrong_latent_channels(tiny):
    dec = tiny["vae_decoder"].with_module(_WrongChannels())
    with pytest.raises(VerificationError, match="vae_decoder@video: forward fails"):
        verify_calls(tiny.replace(vae_decoder=dec))


def test_call_plan_matches_schedule(tiny):
    plan = tiny.call_plan()
    dit_calls = sum(s.count for s in plan if s.component == "dit")
    # 2 latent frames: 20-20-20 for the first, 10-10-10 for the second, twice per step (CFG)
    assert dit_calls == tiny.schedule.dit_calls_per_video == (60 + 30) * 2
    assert {s.key for s in plan if s.component == "dit"} == {f"unit{u}/stage{s}" for u in (0, 1) for s in (0, 1, 2)}
