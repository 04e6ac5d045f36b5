"""Benchmark: each lossy pass on the tiny teacher, first-frame fidelity beside all-frame fidelity and motion.

    .venv/bin/python bench/bench_video_fidelity.py [--passes step_distillation,decoder_swap] [--prompts 16]

Runs each lossy pass of the main job (recipes/default.yaml's settings) alone on the tiny teacher
through `ndopt.run` (the probe at 9 frames, no target) and prints, against the unoptimized teacher:
pixel PSNR on the first frame, on the worst frame and over the clip, the frame-difference (temporal)
PSNR, and latent PSNR per latent frame; then the held-out check of the teacher (`video_following`:
the caption's colour on the first frame, colour and shape on every frame, direction of motion) on
the teacher and on each pass's saved pipeline.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import yaml

import ndopt
from ndopt import threads

# one lossy pass each (with what it needs first), the main job's settings
PASSES: dict[str, list[dict]] = {
    "step_distillation": [{"step_distillation": {"steps": [1, 1, 1], "student_weights": "pyramid-flow-tiny-student-1-1-1",
                                                 "evaluate": False}}],
    "encoder_substitution": [{"encoder_substitution": {"variant": "replace", "dt5_steps": 150, "adapter_steps": 150,
                                                       "eval_prompts": 8}}],
    "decoder_swap": [{"decoder_swap": {"decoder": "tiny", "weights": "pyramid-flow-tiny-decoder", "eval_videos": 4}}],
    "block_pruning": [{"block_importance": None},
                      {"block_pruning": {"keep": 18, "stage1": {"steps": 40, "batch_size": 8}, "evaluate": False}}],
    "aimet_quantization": [{"aimet_quantization": {"precision": "w8a16", "evaluate": False, "export": "none"}}],
}
PROBE = {"prompts": ["a red circle moving left on a dark background", "a yellow square moving up on a light background"],
         "seed": 0, "latent_frames": 2, "height": 64, "width": 64}


def _db(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2f}"


def following(pipeline, n: int, steps) -> dict:
    from ndopt.train.teacher_eval import teacher_video_following

    r = teacher_video_following(pipeline, n, steps=steps)
    return {k: r.count(k) for k in ("first_frame", "every_frame", "moves")} | {"n": r.n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passes", default=",".join(PASSES))
    ap.add_argument("--prompts", type=int, default=16, help="held-out prompts of the following check")
    args = ap.parse_args()
    eval_steps = "eval"  # the teacher's evaluation steps; a step-distilled pipeline keeps its own (None)
    threads.set_override(1)  # tiny tensors: one thread (the figures are the same on two)
    rows, follow = [], {}
    teacher = ndopt.load_model("pyramid-flow-tiny")
    follow["teacher"] = following(teacher, args.prompts, eval_steps)
    with tempfile.TemporaryDirectory(prefix="ndopt-bench-video-") as tmp:
        for name in args.passes.split(","):
            recipe = {"name": f"video-{name}", "model": "pyramid-flow-tiny", "passes": PASSES[name], "probe": PROBE,
                      "fidelity": {"policy": "warn"}, "seed": 0}
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(yaml.safe_dump(recipe, sort_keys=False))
            t0 = time.perf_counter()
            report = ndopt.run(path, out=Path(tmp) / name)
            fid = report["steps"][-1]["fidelity"]["vs_original"]
            motion = (report["steps"][-1]["fidelity"]["motion_original"], report["steps"][-1]["fidelity"]["motion"])
            pix = fid["pixel_psnr_frames"]
            rows.append((name, fid, motion, time.perf_counter() - t0))
            model = ndopt.load_model(report["model"]["path"])
            follow[name] = following(model, args.prompts, None if name == "step_distillation" else eval_steps)
            print(f"{name}: first {_db(pix[0])} dB, worst {_db(min(pix))} dB (frame {fid['worst_frame']}), "
                  f"clip {_db(fid['pixel_psnr'])} dB, temporal {_db(fid['temporal_psnr'])} dB", flush=True)
    print("\n| pass | pixel PSNR first frame | worst frame | all frames | temporal PSNR | latent PSNR per latent frame "
          "| probe motion (teacher -> pass) | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name, fid, (before, after), secs in rows:
        lat = " / ".join(_db(x) for x in fid["latent_psnr_frames"])
        n = len(after["wanted"])
        print(f"| {name} | {_db(fid['pixel_psnr_first_frame'])} | {_db(fid['pixel_psnr_worst_frame'])} "
              f"(frame {fid['worst_frame']}) | {_db(fid['pixel_psnr'])} | {_db(fid['temporal_psnr'])} | {lat} | "
              f"{round(before['rate'] * n)}/{n} -> {round(after['rate'] * n)}/{n} | {secs:.0f} |")
    print(f"\nheld-out following ({args.prompts} prompts, 9 frames): first-frame colour / colour and shape on every "
          "frame / direction of motion")
    print("| pipeline | first frame | every frame | motion |")
    print("|---|---|---|---|")
    for name, f in follow.items():
        print(f"| {name} | {f['first_frame']}/{f['n']} | {f['every_frame']}/{f['n']} | {f['moves']}/{f['n']} |")


if __name__ == "__main__":
    main()
