"""Video-level fidelity (every frame, the worst frame, frame differences) and the motion/shape
detectors, checked on rendered procedural clips whose truth is known."""

from __future__ import annotations

import math

import pytest
import torch

from ndopt.eval.probe import FidelityProbe, ProbeOutput, ProbeSettings
from ndopt.eval.video import caption_direction, motion_direction, shape_track, temporal_psnr, video_metrics
from ndopt.train.data import ProceduralConfig, ProceduralVideos, SceneSpec, render
from ndopt.train.prompt_following import check_clip, shape_kind


def _clip(colour="red", shape="circle", direction="left", background="dark", seed=0, frames=9):
    spec = SceneSpec(colour, shape, direction, background)
    return spec, render(spec, ProceduralConfig(frames=frames), torch.Generator().manual_seed(seed))


def test_identical_videos_are_infinite_on_every_frame():
    _, v = _clip()
    lat = torch.randn(1, 16, 2, 8, 8)
    m = video_metrics(lat, lat, v[None], v[None])
    assert len(m["pixel_psnr_frames"]) == 9 and len(m["latent_psnr_frames"]) == 2
    assert all(math.isinf(x) for x in m["pixel_psnr_frames"] + m["latent_psnr_frames"])
    assert math.isinf(m["temporal_psnr"]) and math.isinf(m["pixel_psnr_worst_frame"])


def test_the_worst_frame_is_the_damaged_one():
    _, v = _clip()
    bad = v.clone()
    bad[:, 6] = (bad[:, 6] + 0.2 * torch.randn(bad[:, 6].shape, generator=torch.Generator().manual_seed(1)))
    lat = torch.randn(1, 16, 2, 8, 8)
    lat2 = lat.clone()
    lat2[:, :, 1] += 0.1
    m = video_metrics(lat2, lat, bad[None], v[None])
    assert m["worst_frame"] == 6 and m["pixel_psnr_worst_frame"] < 25
    assert math.isinf(m["pixel_psnr_first_frame"]) and math.isinf(m["latent_psnr_frames"][0])
    assert m["latent_psnr_worst_frame"] == m["latent_psnr_frames"][1] < 40


def test_a_frozen_video_keeps_its_first_frame_but_loses_the_motion():
    """Every frame the first: per-frame PSNR only degrades with distance, the frame-difference figure
    collapses (the reference moves, the copy does not)."""
    _, v = _clip(direction="right")
    frozen = v[:, :1].expand_as(v).clone()
    m = video_metrics(torch.zeros(1, 1, 2, 1, 1), torch.zeros(1, 1, 2, 1, 1), frozen[None], v[None])
    assert math.isinf(m["pixel_psnr_first_frame"]) and m["worst_frame"] == 8
    assert temporal_psnr(frozen[None], v[None]) < m["pixel_psnr_worst_frame"] + 10
    assert motion_direction(frozen) == "still" and motion_direction(v) == "right"


@pytest.mark.parametrize("direction", ["left", "right", "up", "down", "still"])
def test_motion_direction_reads_rendered_motion(direction):
    hits = sum(motion_direction(_clip(direction=direction, seed=s)[1]) == direction for s in range(6))
    assert hits == 6


def test_shape_kind_and_every_frame_check_on_rendered_clips():
    cfg = ProceduralConfig()
    ds = ProceduralVideos(cfg, seed=3)
    checks = [check_clip(ds[i].video, ds.scene(i)[0], cfg) for i in range(40)]
    visible = [c for c in checks if c.colours[0] is not None]  # white/pink on a light background are faint
    assert len(visible) >= 34
    assert all(c.every_frame and c.moves for c in visible), [c for c in visible if not (c.every_frame and c.moves)]
    for shape in cfg.shapes:  # each kind against the others, the large size too
        for size_seed in range(3):
            spec = SceneSpec("yellow", shape, "still", "dark", "large" if size_seed else "")
            frame = render(spec, ProceduralConfig(frames=1), torch.Generator().manual_seed(size_seed))[:, 0]
            assert shape_kind(frame, cfg.shapes) == shape


def test_nothing_to_follow_on_a_blank_clip():
    blank = torch.zeros(3, 9, 64, 64)
    assert motion_direction(blank) is None and shape_track(blank).found == 0
    assert shape_kind(blank[:, 0], ("circle", "square")) is None


def test_caption_direction():
    assert caption_direction("a red circle moving left on a dark background") == "left"
    assert caption_direction("a large blue ring moving down on a light background") == "down"
    assert caption_direction("a red circle on a dark background") == "still"


def test_probe_reports_every_frame_and_motion():
    _, v = _clip(direction="left")
    probe = FidelityProbe(ProbeSettings(prompts=("a red circle moving left on a dark background",)))
    ref = ProbeOutput(torch.randn(1, 16, 2, 8, 8), v[None])
    out = ProbeOutput(ref.latents + 0.01, v[None].flip(-1))  # mirrored: it now moves right
    m = probe.compare(out, ref)
    assert len(m["pixel_psnr_frames"]) == 9 and m["pixel_psnr"] < 30 and "temporal_psnr" in m
    assert probe.motion(ref) == {"rate": 1.0, "wanted": ["left"], "found": ["left"]}
    assert probe.motion(out)["found"] == ["right"] and probe.motion(out)["rate"] == 0.0


def test_report_tables_and_plots_fidelity_per_frame(tmp_path):
    from ndopt.report import plot_report, render_markdown

    _, v = _clip(direction="left")
    probe = FidelityProbe(ProbeSettings(prompts=("a red circle moving left on a dark background",)))
    ref = ProbeOutput(torch.randn(1, 16, 2, 8, 8), v[None])
    noisy = ProbeOutput(ref.latents + 0.05, (v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(0)))[None])
    cost = {"params_total": 10, "flops_per_video": 100, "dit_calls_per_video": 6}
    fid = {"contract": "lossy", "vs_previous": probe.compare(noisy, ref), "vs_original": probe.compare(noisy, ref),
           "metric": "latent_psnr", "budget_db": 10.0, "motion": probe.motion(noisy), "motion_original": probe.motion(ref)}
    report = {"recipe": {"name": "r", "model": "m"}, "status": "ok", "steps": [
        {"index": 1, "name": "lossy_one", "modified": True, "cost": cost, "fidelity": fid}]}
    paths = plot_report(tmp_path, report)
    assert paths["fidelity_frames"].read_bytes()[:4] == b"\x89PNG"
    md = render_markdown(report)
    first, worst = fid["vs_original"]["pixel_psnr_first_frame"], fid["vs_original"]["pixel_psnr_worst_frame"]
    assert f"{first:.2f} / {worst:.2f} (frame {fid['vs_original']['worst_frame']})" in md
    assert "| 1/1 -> 1/1 |" in md and "first / worst frame" in md
