"""Train the tiny teacher: the bundled weights of `pyramid-flow-tiny`, from scratch, on procedural videos.

    python -m ndopt.train.teacher --out runs/tiny-teacher [--config ndopt/train/tiny_teacher.yaml]
                                  [--install] [--scale 0.01]

Three phases, each a `Trainer.fit()` that checkpoints and resumes (rerun the same command after
an interruption and it carries on where it stopped):

1. `vae`: the causal VAE (encoder and decoder) autoencodes procedural clips (VAEReconstruction);
2. `latents`: a pool of clips is encoded once through the trained encoder (LatentCache);
3. `dit`: the DiT and the text encoder learn the pyramidal flow-matching objective (seed eq. 6-7)
   on the pool, with 10% of captions dropped for classifier-free guidance, and an EMA of weights.

Then the pipeline is checked for prompt following on held-out (colour, shape) pairs, and its
weights are written by its frontend (`save_weights`) to `<out>/pyramid-flow-tiny.safetensors` (and,
with `--install`, as the preset's bundled weights, which the tiny preset loads by default).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ndopt.errors import NdoptError
from ndopt.io import atomic_write_json
from ndopt.ir.pipeline import Pipeline
from ndopt.train.data import LatentCache, ProceduralConfig, ProceduralVideos
from ndopt.train.engine import TrainConfig, Trainer, TrainResult
from ndopt.train.objectives import (
    PromptEncoder,
    PyramidalFlowMatching,
    VAEReconstruction,
    standardize_latents,
)
from ndopt.train.prompt_following import held_out_scenes, prompt_following, video_following

log = logging.getLogger("ndopt")

DEFAULT_CONFIG = Path(__file__).with_name("tiny_teacher.yaml")
PRESET = "pyramid-flow-tiny"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PhaseSpec(_Strict):
    steps: int = Field(ge=0)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    warmup_steps: int = 0
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    ema_decay: float | None = None
    lr_multipliers: dict[str, float] = Field(default_factory=dict)

    def train_config(self, seed: int, checkpoint_every: int, scale: float = 1.0) -> TrainConfig:
        steps = max(1, round(self.steps * scale)) if self.steps else 0
        return TrainConfig(steps=steps, batch_size=self.batch_size, lr=self.lr,
                           warmup_steps=min(self.warmup_steps, steps // 4), lr_schedule=self.lr_schedule,
                           weight_decay=self.weight_decay, grad_clip=self.grad_clip, ema_decay=self.ema_decay,
                           lr_multipliers=dict(self.lr_multipliers), checkpoint_every=checkpoint_every,
                           log_every=max(1, min(25, steps // 10)), seed=seed)


class VAESpec(PhaseSpec):
    frames: int = 9  # clip length of this phase (1: images, cheap; 9: the temporal path too)
    latent_noise: float = 0.05
    foreground_weight: float = 0.0
    chroma_weight: float = 0.0
    # False: the encoder is frozen and only the decoder trains (its latents, and so a DiT trained on
    # them, stay valid: a decoder can keep improving after the DiT phase has started)
    train_encoder: bool = True


class DiTSpec(PhaseSpec):
    text_len: int = 24
    uncond_prob: float = 0.1
    train_text_encoder: bool = True
    # probability that a step's stage trains a later (motion-carrying) latent frame, not the first;
    # None: uniform over the clip's frames, as upstream
    video_prob: float | None = Field(None, ge=0, le=1)


class EvalSpec(_Strict):
    prompts: int = 16
    steps: tuple[int, int, int] = (6, 6, 6)
    seed: int = 0


class TeacherConfig(_Strict):
    seed: int = 0
    data: dict[str, Any] = Field(default_factory=dict)  # ProceduralConfig fields
    vae: list[VAESpec] = Field(min_length=1)  # phases, in order (e.g. images first, then clips)
    # fields of the preset's component configs to override ({"vae": {...}, "dit": {...}}): a wider
    # teacher; the weights record what they were trained with, and the preset loads that
    architecture: dict[str, dict[str, Any]] = Field(default_factory=dict)
    vae_init: str = "default"  # "default": PyTorch's init (trains faster than upstream's N(0, 0.02) here)
    latent_clips: int = Field(4096, ge=1)
    dit: DiTSpec
    checkpoint_every: int = 100
    eval: EvalSpec = Field(default_factory=EvalSpec)
    # the decoder-only VAE phases after the last joint one train in a second process beside the DiT:
    # they read only the frozen encoder, the DiT only its latents, so neither waits for the other
    # (the torch threads are split between them); False: every VAE phase runs first, in order
    decoder_beside_dit: bool = False

    def decoder_tail(self) -> int:
        """Index of the first VAE phase of the trailing decoder-only run (len(vae) if there is none)."""
        i = len(self.vae)
        while i > 0 and not self.vae[i - 1].train_encoder:
            i -= 1
        return i

    def procedural(self) -> ProceduralConfig:
        return ProceduralConfig(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v)
                                   if isinstance(v, list) else v for k, v in self.data.items()})


def load_config(path: Path | str = DEFAULT_CONFIG) -> TeacherConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
        return TeacherConfig(**raw)
    except FileNotFoundError:
        raise NdoptError(f"{path}: no such teacher config") from None
    except (yaml.YAMLError, ValidationError, TypeError) as e:
        raise NdoptError(f"{path}: invalid teacher config: {e}") from None


def fresh_pipeline(seed: int, architecture: dict[str, dict[str, Any]] | None = None) -> Pipeline:
    """The tiny preset's modules with upstream's initialisation (never the bundled weights), from its
    frontend (`ModelInterface.untrained`), with the teacher config's architecture overrides."""
    from ndopt.model import frontend_of

    iface = frontend_of(PRESET).require("untrained", user="the teacher trainer")
    return iface.untrained(PRESET, seed, architecture) if architecture else iface.untrained(PRESET, seed)


@torch.no_grad()
def vae_reconstruction(pipeline: Pipeline, config: ProceduralConfig, n: int = 16, frames: int = 9,
                       seed: int = 4321) -> list[float]:
    """Pixel PSNR (dB) of the VAE's reconstruction of `n` held-out clips, per latent frame (latent frame 0
    is video frame 0; latent frame k the `temporal` video frames it compresses)."""
    from ndopt.eval.metrics import pixel_psnr

    ds = ProceduralVideos(dc_replace(config, frames=frames), seed=seed, held_out=True)
    video = torch.stack([ds[i].video for i in range(n)])
    enc, dec = pipeline["vae_encoder"].module, pipeline["vae_decoder"].module
    z = enc(video)
    rec = dec(z)
    per = (frames - 1) // max(1, z.shape[2] - 1) if z.shape[2] > 1 else 1
    groups = [[0]] + [list(range(1 + per * (k - 1), 1 + per * k)) for k in range(1, z.shape[2])]
    return [pixel_psnr(rec[:, :, g], video[:, :, g]) for g in groups]


def train_vae_phase(pipe: Pipeline, vae: VAESpec, index: int, config: TeacherConfig, out: Path, *,
                    device: torch.device, scale: float = 1.0, show_progress: bool | None = None,
                    suffix: str = "") -> TrainResult:
    """VAE phase `index` of the teacher (resuming from out/vae<index><suffix>): encoder and decoder, or
    the decoder alone against the frozen encoder (`train_encoder: false`)."""
    enc, dec = pipe["vae_encoder"].module, pipe["vae_decoder"].module
    trainable = {"vae_encoder": enc, "vae_decoder": dec} if vae.train_encoder else {"vae_decoder": dec}
    return Trainer(trainable=trainable, frozen={} if vae.train_encoder else {"vae_encoder": enc},
                   objective=VAEReconstruction(vae.latent_noise, foreground_weight=vae.foreground_weight,
                                               chroma_weight=vae.chroma_weight),
                   data=ProceduralVideos(dc_replace(config.procedural(), frames=vae.frames),
                                         seed=config.seed + 100 * index),
                   config=vae.train_config(config.seed + index, config.checkpoint_every, scale),
                   run_dir=Path(out) / f"vae{index}{suffix}", device=device, name=f"teacher/vae{index}",
                   show_progress=show_progress).fit()


def train_teacher(config: TeacherConfig, out: Path, *, scale: float = 1.0, device: str = "cpu",
                  show_progress: bool | None = None) -> tuple[Pipeline, dict[str, Any]]:
    """Run the three phases (resuming each from its checkpoints) and evaluate; returns the pipeline."""
    t0 = time.perf_counter()
    out = Path(out)
    pipe = fresh_pipeline(config.seed, config.architecture)
    data_cfg = config.procedural()
    dev = torch.device(device)
    report: dict[str, Any] = {"config": config.model_dump(), "scale": scale, "phases": {}}

    enc, dec = pipe["vae_encoder"].module, pipe["vae_decoder"].module
    if config.vae_init == "default":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            for m in [*enc.modules(), *dec.modules()]:
                if isinstance(m, (torch.nn.Conv3d, torch.nn.Conv2d, torch.nn.Linear)):
                    m.reset_parameters()
    tail = config.decoder_tail() if config.decoder_beside_dit else len(config.vae)
    for i, vae in enumerate(config.vae[:tail]):
        res = train_vae_phase(pipe, vae, i, config, out, device=dev, scale=scale, show_progress=show_progress)
        report["phases"][f"vae{i}"] = {"final": res.final, "seconds": res.seconds}
    calib = torch.stack([ProceduralVideos(data_cfg, seed=config.seed + 99)[i].video for i in range(32)]).to(dev)
    report["standardize"] = standardize_latents(enc, dec, calib)

    beside = _DecoderBeside(pipe, config, out, tail, scale=scale, device=device) if tail < len(config.vae) else None
    try:
        clips = max(8, round(config.latent_clips * min(1.0, scale * 10)))
        cache = LatentCache(ProceduralVideos(data_cfg, seed=config.seed + 1), enc, out / "cache", size=clips,
                            name="procedural").load()
        lat = cache.latents
        report["latents"] = {"clips": clips, "mean": float(lat.mean()), "std": float(lat.std())}
        log.info("teacher: latent pool %d clips, mean %.3f std %.3f", clips, float(lat.mean()), float(lat.std()))

        d = config.dit
        te = PromptEncoder(pipe["text_encoder"].module, d.text_len)
        objective = PyramidalFlowMatching(pipe.schedule, uncond_prob=d.uncond_prob,
                                          train_text_encoder=d.train_text_encoder, video_prob=d.video_prob)
        trainable = {"dit": pipe["dit"].module}
        frozen = {}
        (trainable if d.train_text_encoder else frozen)["text_encoder"] = te
        res = Trainer(trainable=trainable, frozen=frozen, objective=objective, data=cache,
                      config=d.train_config(config.seed, config.checkpoint_every, scale), run_dir=out / "dit",
                      device=dev, name="teacher/dit", show_progress=show_progress).fit()
        report["phases"]["dit"] = {"final": res.final, "seconds": res.seconds}
        if beside is not None:
            beside.finish(report)
    finally:
        if beside is not None:
            beside.close()  # on an error or an interrupt, the decoder stops too (at a step: both resume)
    report["vae_reconstruction_db"] = vae_reconstruction(pipe, data_cfg)
    log.info("teacher: VAE reconstruction of held-out clips per latent frame: %s dB",
             ", ".join(f"{x:.2f}" for x in report["vae_reconstruction_db"]))

    ev = config.eval
    pf = prompt_following(pipe, held_out_scenes(ev.prompts, data_cfg), seed=ev.seed, steps=ev.steps,
                          config=data_cfg)
    report["prompt_following"] = pf.to_json()
    report["video_following"] = video_following(pipe, held_out_scenes(ev.prompts, data_cfg), seed=ev.seed,
                                                steps=ev.steps, config=data_cfg).to_json()
    report["seconds"] = time.perf_counter() - t0
    log.info("teacher: prompt following on %d held-out prompts: %.0f%%", pf.n, 100 * pf.rate)
    atomic_write_json(out / "report.json", report)
    return pipe, report


class _DecoderBeside:
    """The trailing decoder-only VAE phases in a spawned process beside the DiT (`decoder_beside_dit`).

    The standardized VAE is handed over in `<out>/vae_standardized.safetensors`; the child trains the
    decoder phases (each resumable from `<out>/vae<i>-beside`: they train in the standardized latent
    space, so never from an in-order run's `vae<i>`) and writes the decoder to
    `<out>/vae_decoder.safetensors`, which `finish` loads into the pipeline. The threads are split: the
    child takes half, the DiT the rest (at least one each). A child that fails is logged at once."""

    def __init__(self, pipe: Pipeline, config: TeacherConfig, out: Path, first: int, *, scale: float,
                 device: str) -> None:
        import multiprocessing
        import threading

        from safetensors.torch import save_file

        from ndopt.io import atomic_path

        self.pipe, self.out, self.first = pipe, Path(out), first
        self.threads = torch.get_num_threads()
        child = max(1, self.threads // 2)
        if self.threads < 2:
            log.warning("teacher: decoder_beside_dit with 1 thread: the decoder and the DiT take one each")
        self.decoder_file = self.out / "vae_decoder.safetensors"
        self.report_file = self.out / "vae_decoder.json"
        state = {f"{name}.{k}": v.detach().cpu().contiguous()
                 for name in ("vae_encoder", "vae_decoder") for k, v in pipe[name].module.state_dict().items()}
        self.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.out / "vae_standardized.safetensors") as tmp:
            save_file(state, str(tmp))
        self.process = multiprocessing.get_context("spawn").Process(
            target=_train_decoder_beside, args=(config.model_dump(), str(self.out), first, scale, device, child),
            name="teacher/decoder")
        self.process.start()
        self._lock = threading.Lock()
        torch.set_num_threads(max(1, self.threads - child))
        threading.Thread(target=self._watch, daemon=True).start()
        log.info("teacher: VAE phases %d-%d (decoder only) train beside the DiT (pid %d, %d thread(s); DiT %d)",
                 first, len(config.vae) - 1, self.process.pid, child, torch.get_num_threads())

    def _exitcode(self) -> int | None:
        """Wait for the child, then reap it under a lock: two threads reaping at once race (one sees no
        child and returns None before the other has stored the exit code)."""
        from multiprocessing.connection import wait

        wait([self.process.sentinel])
        with self._lock:  # the sentinel fires as the child closes it, maybe before it can be reaped: join
            self.process.join()
            return self.process.exitcode

    def _watch(self) -> None:
        if self._exitcode():
            log.error("teacher: the decoder phases beside the DiT stopped (exit code %s); the DiT goes on, and a "
                      "rerun resumes them", self.process.exitcode)

    def finish(self, report: dict[str, Any]) -> None:
        """Wait for the decoder phases and load their decoder into the pipeline."""
        import json

        from safetensors.torch import load_file

        code = self._exitcode()
        if code != 0 or not self.decoder_file.exists():
            raise NdoptError(f"teacher: the decoder phases beside the DiT failed (exit code {code}); "
                             f"rerun the same command: they resume from {self.out}/vae{self.first}-beside..")
        self.pipe["vae_decoder"].module.load_state_dict(load_file(str(self.decoder_file)), strict=True)
        report["phases"].update(json.loads(self.report_file.read_text()))

    def close(self) -> None:
        """Stop the child if it still runs (SIGTERM: it saves at its next step) and give the threads back."""
        with self._lock:
            alive = self.process.is_alive()
        if alive:
            self.process.terminate()
            self._exitcode()
        torch.set_num_threads(self.threads)


def _train_decoder_beside(config: dict[str, Any], out: str, first: int, scale: float, device: str,
                          threads: int) -> None:
    """The child of `_DecoderBeside`: load the standardized VAE, train phases `first`.., save the decoder.
    Ctrl-C reaches the parent, which stops this process with SIGTERM; that stops at a step boundary."""
    import signal

    from safetensors.torch import load_file, save_file

    from ndopt import interrupt
    from ndopt.io import atomic_path
    from ndopt.progress import setup_logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    setup_logging()
    cfg, out_dir = TeacherConfig(**config), Path(out)
    pipe = fresh_pipeline(cfg.seed, cfg.architecture)
    state = load_file(str(out_dir / "vae_standardized.safetensors"))
    for name in ("vae_encoder", "vae_decoder"):
        own = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        pipe[name].module.load_state_dict(own, strict=True)
    phases = {}
    with interrupt.handle_signals():
        for i in range(first, len(cfg.vae)):
            res = train_vae_phase(pipe, cfg.vae[i], i, cfg, out_dir, device=torch.device(device), scale=scale,
                                  show_progress=False, suffix="-beside")
            phases[f"vae{i}"] = {"final": res.final, "seconds": res.seconds}
    dec = pipe["vae_decoder"].module
    atomic_write_json(out_dir / "vae_decoder.json", phases)
    with atomic_path(out_dir / "vae_decoder.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in dec.state_dict().items()}, str(tmp))


def main(argv: list[str] | None = None) -> int:
    from ndopt.model import frontend_of
    from ndopt.train.engine import add_script_options, start_script

    ap = argparse.ArgumentParser(prog="python -m ndopt.train.teacher", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="run directory (checkpoints, cache, report)")
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every phase's steps (smoke runs: 0.01)")
    ap.add_argument("--device", default="cpu")
    add_script_options(ap, "also write the weights into the package (the tiny preset's default weights)")
    args = ap.parse_args(argv)
    start_script(args)
    from ndopt import interrupt

    with interrupt.handle_signals():  # SIGTERM too stops at a step (and stops a decoder beside the DiT)
        pipe, _report = train_teacher(load_config(args.config), args.out, scale=args.scale, device=args.device)
    pipe = pipe.replace()  # modules are back in eval mode; save from CPU
    iface = frontend_of(PRESET).require("save_weights", user="the teacher trainer")
    weights = iface.save_weights(_to_cpu(pipe), args.out / f"{PRESET}.safetensors")
    log.info("teacher: weights %s (%.1f MB)", weights, weights.stat().st_size / 1e6)
    if args.install:
        target = iface.save_weights(_to_cpu(pipe))
        log.info("teacher: installed as the tiny preset's weights: %s", target)
        log.warning("teacher: the bundled students and tiny decoder were distilled from the previous teacher "
                    "and now refuse to load; rebuild them: python -m ndopt.train.dependents --install")
    return 0


def _to_cpu(pipe: Pipeline) -> Pipeline:
    for c in pipe.components.values():
        c.module.to("cpu")
    return pipe


if __name__ == "__main__":
    raise SystemExit(main())
