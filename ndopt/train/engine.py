"""The one training engine: every fine-tune and distillation in ndopt runs through `Trainer.fit`.

    trainer = Trainer(trainable={"dit": dit}, frozen={"text_encoder": te, "teacher": teacher},
                      objective=PyramidalFlowMatching(schedule), data=latent_cache,
                      config=TrainConfig(steps=200, batch_size=16, lr=1e-4, checkpoint_every=50),
                      run_dir=ctx.run_dir / "train" / "stage2", device=ctx.device)
    result = trainer.fit()          # resumes from run_dir/checkpoints if a checkpoint is there

What it does: AdamW over the trainable modules (per-module lr multipliers), warmup + constant or
cosine lr, gradient accumulation, gradient clipping, bf16/fp16 autocast where the device has it,
an optional EMA of the weights, a checkpoint every N steps (atomic; the last K kept), metrics to
`run_dir/metrics.json` and a loss plot, a rich progress bar, and torchrun (DDP, or FSDP for large
components) through `ndopt.train.distributed`.

Determinism: the samples of step s are a function of (seed, s) (stream positions, per-sample
seeds), the lr is a function of s, and the global RNG is reseeded per micro-step, so a run
resumed from its checkpoint at step k ends bit-identical to an uninterrupted one, and a
`torchrun --nproc_per_node 2` run sees the same global batches as one process.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ndopt import interrupt
from ndopt.errors import NdoptError
from ndopt.io import atomic_path, atomic_write_json, atomic_write_text, jsonable
from ndopt.progress import progress
from ndopt.train import distributed as D
from ndopt.train.data import Dataset, collate, sample_seed
from ndopt.train.objectives import Objective, StepInfo

log = logging.getLogger("ndopt")

CHECKPOINTS = "checkpoints"
LATEST = "latest"


@dataclass(frozen=True)
class TrainConfig:
    """How to train. `batch_size` is the global batch of one optimizer step (all processes and
    micro-steps together): per process and micro-step it is batch_size / (world * grad_accum)."""

    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    lr_multipliers: Mapping[str, float] = field(default_factory=dict)  # per trainable module
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    grad_clip: float | None = 1.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA with bf16, else fp32
    ema_decay: float | None = None
    checkpoint_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    shuffle: bool = True
    dropout: bool = False  # False: modules train in eval mode (no dropout: deterministic, DDP-equal)
    strategy: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    fsdp_min_params: int = 100_000_000  # auto: FSDP for trainable modules at least this large

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise NdoptError(f"TrainConfig: steps={self.steps}, batch_size={self.batch_size}, "
                             f"grad_accum={self.grad_accum}: need steps >= 0 and positive batch and accumulation")
        if self.lr <= 0:
            raise NdoptError(f"TrainConfig.lr={self.lr}: must be positive")

    def lr_factor(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_schedule == "cosine" and self.steps > self.warmup_steps:
            p = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))
        return 1.0


_OVERRIDES: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("ndopt_train_overrides",
                                                                                     default=None)


@contextlib.contextmanager
def overrides(**values: Any) -> Iterator[None]:
    """TrainConfig fields that every Trainer built inside takes over the config it is given: how a
    launcher changes how a pass trains (`strategy="fsdp"`, `precision="bf16"`) without the pass's code
    or its recipe knowing (python -m ndopt.train.smoke)."""
    known = {f.name for f in fields(TrainConfig)}
    bad = sorted(set(values) - known)
    if bad:
        raise NdoptError(f"training overrides {bad} are not TrainConfig fields; choose from {sorted(known)}")
    replace(TrainConfig(), **values)  # checked now, not at the first Trainer
    token = _OVERRIDES.set({**(_OVERRIDES.get() or {}), **values})
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


@dataclass(frozen=True)
class TrainResult:
    steps: int
    resumed_from: int | None
    history: list[dict[str, float]]
    final: dict[str, float]
    checkpoint: Path | None
    seconds: float

    def loss_curve(self, key: str = "loss") -> list[float]:
        return [h[key] for h in self.history if key in h]


class _Modules:
    """What objectives see: wrapped callables by name, and the raw modules for hooks."""

    def __init__(self, wrapped: Mapping[str, nn.Module], raw: Mapping[str, nn.Module]) -> None:
        self._wrapped, self._raw = dict(wrapped), dict(raw)

    def __getitem__(self, name: str) -> nn.Module:
        try:
            return self._wrapped[name]
        except KeyError:
            raise NdoptError(f"the objective needs module {name!r}; the trainer has "
                             f"{sorted(self._wrapped)} (pass it as trainable or frozen)") from None

    def __contains__(self, name: str) -> bool:
        return name in self._wrapped

    def raw(self, name: str) -> nn.Module:
        return self._raw[name]


def _autocast(device: torch.device, precision: str) -> tuple[contextlib.AbstractContextManager, str]:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext(), precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype), precision


def _micro_seed(seed: int, step: int, micro: int, rank: int) -> int:
    h = hashlib.blake2b(f"global:{seed}:{step}:{micro}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class Trainer:
    """Trains `trainable` modules (in place) to minimise `objective` on `data`; see the module doc."""

    def __init__(self, *, trainable: Mapping[str, nn.Module], objective: Objective, data: Dataset,
                 config: TrainConfig, run_dir: Path, frozen: Mapping[str, nn.Module] | None = None,
                 device: torch.device | str | None = None, name: str = "train", show_progress: bool | None = None
                 ) -> None:
        if not trainable:
            raise NdoptError("Trainer: nothing to train (trainable is empty)")
        frozen = dict(frozen or {})
        clash = sorted(set(trainable) & set(frozen))
        if clash:
            raise NdoptError(f"Trainer: {clash} are both trainable and frozen")
        needed = [u for u in getattr(objective, "uses", ()) if u not in trainable and u not in frozen]
        if needed:
            raise NdoptError(f"Trainer: the objective uses {needed}, which are neither trainable nor frozen")
        self.trainable, self.frozen = dict(trainable), frozen
        self.objective, self.data, self.config = objective, data, replace(config, **(_OVERRIDES.get() or {}))
        self.run_dir = Path(run_dir)
        first = next(iter(self.trainable.values()))
        self.device = torch.device(device) if device is not None else next(first.parameters()).device
        self.name = name
        self.show_progress = show_progress
        self._perm_cache: tuple[int, torch.Tensor] | None = None

    # ---- data -----------------------------------------------------------------------------
    def _dataset_index(self, position: int) -> int:
        n = len(self.data)
        if not self.config.shuffle:
            return position % n
        epoch = position // n
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            g = torch.Generator().manual_seed(sample_seed(self.config.seed, epoch, "epoch"))
            self._perm_cache = (epoch, torch.randperm(n, generator=g))
        return int(self._perm_cache[1][position % n])

    def positions(self, step: int, micro: int, rank: int, world: int) -> list[int]:
        """Stream positions of the samples this process takes at (step, micro-step)."""
        cfg = self.config
        per = cfg.batch_size // (world * cfg.grad_accum)
        first = step * cfg.batch_size + micro * per * world + rank * per
        return list(range(first, first + per))

    def batch(self, step: int, micro: int = 0, rank: int = 0, world: int = 1):
        pos = self.positions(step, micro, rank, world)
        examples = [self.data[self._dataset_index(p)] for p in pos]
        return collate(examples, pos, [sample_seed(self.config.seed, p) for p in pos]).to(self.device)

    # ---- checkpoints ----------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / CHECKPOINTS

    def latest_checkpoint(self) -> Path | None:
        pointer = self.checkpoint_dir / LATEST
        if not pointer.is_file():
            return None
        path = self.checkpoint_dir / pointer.read_text().strip()
        if not path.is_file():
            raise NdoptError(f"{pointer} names {path.name}, which is missing: delete {self.checkpoint_dir} "
                             "to start over")
        return path

    def _state(self, optimizer: torch.optim.Optimizer, scaler: Any, ema: dict | None, step: int,
               history: list[dict[str, float]]) -> dict[str, Any] | None:
        if self._fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            modules = get_model_state_dict(self._container, options=opts)
            optim = get_optimizer_state_dict(self._container, optimizer, options=opts)
            if not self._env.is_main:
                return None
        else:
            if not self._env.is_main:
                return None
            modules = {f"{n}.{k}": v for n, m in self.trainable.items() for k, v in m.state_dict().items()}
            optim = optimizer.state_dict()
        return {"step": step, "modules": modules, "optimizer": optim,
                "scaler": scaler.state_dict() if scaler is not None else None, "ema": ema,
                "history": history, "config": jsonable(asdict(self.config)), "world": self._env.world}

    def save_checkpoint(self, state: dict[str, Any] | None) -> Path | None:
        if state is None:
            return None
        step = state["step"]
        d = self.checkpoint_dir
        path = d / f"step-{step:07d}.pt"
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        atomic_write_text(d / LATEST, path.name)
        for old in sorted(d.glob("step-*.pt"))[:-max(1, self.config.keep_checkpoints)]:
            old.unlink(missing_ok=True)
        log.info("%s: checkpoint at step %d: %s", self.name, step, path)
        return path

    def _load(self, path: Path, optimizer: torch.optim.Optimizer, scaler: Any) -> dict[str, Any]:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = sorted({k.split(".", 1)[0] for k in state["modules"]})
        if saved != sorted(self.trainable):
            raise NdoptError(f"{self.name}: checkpoint {path} trains {saved}, this run {sorted(self.trainable)}: "
                             f"the run's configuration changed; start it in a new run directory")
        if self._fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self._container, state["modules"], options=opts)
            set_optimizer_state_dict(self._container, optimizer, state["optimizer"], options=opts)
        else:
            for n, m in self.trainable.items():
                prefix = f"{n}."
                m.load_state_dict({k[len(prefix):]: v for k, v in state["modules"].items() if k.startswith(prefix)})
            optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        return state

    # ---- the loop -------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg = self.config
        t0 = time.perf_counter()
        self._env = env = D.init_from_env(self.device)
        per = cfg.batch_size // (env.world * cfg.grad_accum)
        if per < 1 or per * env.world * cfg.grad_accum != cfg.batch_size:
            raise NdoptError(f"TrainConfig.batch_size={cfg.batch_size} must be a multiple of processes "
                             f"({env.world}) x grad_accum ({cfg.grad_accum})")
        for m in self.trainable.values():
            m.to(self.device).train(cfg.dropout).requires_grad_(True)
        for m in self.frozen.values():
            m.to(self.device).eval().requires_grad_(False)
        strategies = {n: D.choose_strategy(m, cfg.strategy, env, cfg.fsdp_min_params) for n, m in self.trainable.items()}
        self._fsdp = any(s == "fsdp" for s in strategies.values())
        if self._fsdp and cfg.ema_decay:
            raise NdoptError("TrainConfig.ema_decay with FSDP is not supported: train without EMA or use DDP")
        wrapped = {n: D.wrap(m, strategies[n], env, self.device) for n, m in self.trainable.items()}
        # FSDP trains a sharded copy; the caller's modules get its full weights back when fit ends (_unshard)
        self._owners = dict(self.trainable)
        self.trainable = {n: wrapped[n] if strategies[n] == "fsdp" else m for n, m in self.trainable.items()}
        self._container = nn.ModuleDict(self.trainable)
        modules = _Modules({**wrapped, **self.frozen}, {**self.trainable, **self.frozen})

        groups = [{"params": [p for p in m.parameters() if p.requires_grad],
                   "lr": cfg.lr * cfg.lr_multipliers.get(n, 1.0), "name": n} for n, m in self.trainable.items()]
        for g in groups:
            g["base_lr"] = g["lr"]
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                      weight_decay=cfg.weight_decay)
        autocast, precision = _autocast(self.device, cfg.precision)
        scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        params = [p for g in groups for p in g["params"]]
        ema = None
        if cfg.ema_decay:
            ema = {f"{n}.{k}": p.detach().float().clone() for n, m in self.trainable.items()
                   for k, p in m.named_parameters() if p.requires_grad}

        start, history, resumed = 0, [], None
        ckpt = self.latest_checkpoint()
        if ckpt is not None:
            state = self._load(ckpt, optimizer, scaler)
            start, history, resumed = int(state["step"]), list(state["history"]), int(state["step"])
            if state.get("ema") is not None:
                ema = state["ema"]
            log.info("%s: resumed from %s (step %d of %d)", self.name, ckpt, start, cfg.steps)
        if start >= cfg.steps:
            for m in self.trainable.values():
                m.eval().requires_grad_(False)
            if ema is not None:
                self._apply_ema(ema)
            self._unshard()
            D.shutdown(env)
            return TrainResult(start, resumed, history, history[-1] if history else {}, ckpt,
                               time.perf_counter() - t0)

        last_path: Path | None = ckpt
        window: list[dict[str, float]] = []
        step_t0 = time.perf_counter()
        cooperative = interrupt.safe_points() if env.world == 1 else contextlib.nullcontext()
        with progress(f"{self.name}", cfg.steps - start,
                      enabled=None if self.show_progress is None else self.show_progress) as advance, cooperative:
            for step in range(start, cfg.steps):
                factor = cfg.lr_factor(step)
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * factor
                metrics_acc: dict[str, float] = {}
                for micro in range(cfg.grad_accum):
                    torch.manual_seed(_micro_seed(cfg.seed, step, micro, env.rank))
                    batch = self.batch(step, micro, env.rank, env.world)
                    info = StepInfo(step, micro, env.rank, env.world, cfg.seed)
                    with D.no_grad_sync(wrapped, strategies, micro < cfg.grad_accum - 1), autocast:
                        out = self.objective(modules, batch, info)
                        loss = out.loss / cfg.grad_accum
                    if not torch.isfinite(out.loss):
                        raise NdoptError(f"{self.name}: the loss is {float(out.loss.detach())} at step {step}; lower the lr "
                                         f"({cfg.lr}) or check the data")
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                    for k, v in out.metrics.items():
                        metrics_acc[k] = metrics_acc.get(k, 0.0) + v / cfg.grad_accum
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if cfg.grad_clip:
                    gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    metrics_acc["grad_norm"] = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    self._update_ema(ema, cfg.ema_decay)
                metrics = D.mean_over_processes(metrics_acc, env)
                metrics["lr"] = cfg.lr * factor
                window.append(metrics)
                advance(f"loss {metrics.get('loss', float('nan')):.4f}")
                done = step + 1
                if done % max(1, cfg.log_every) == 0 or done == cfg.steps:
                    row = {k: sum(w[k] for w in window if k in w) / sum(1 for w in window if k in w)
                           for k in window[-1]}
                    row["step"] = done
                    row["seconds_per_step"] = (time.perf_counter() - step_t0) / len(window)
                    history.append(row)
                    window, step_t0 = [], time.perf_counter()
                    log.info("%s step %d/%d: %s", self.name, done, cfg.steps,
                             ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in ("step",)))
                    if env.is_main:
                        atomic_write_json(self.run_dir / "metrics.json", {"name": self.name, "history": history})
                saved = (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps
                if saved:
                    last_path = self.save_checkpoint(self._state(optimizer, scaler, ema, done, history)) or last_path
                    D.barrier(env)
                if interrupt.pending():  # a signal: keep this step's work, then stop (a rerun resumes here)
                    if not saved:
                        self.save_checkpoint(self._state(optimizer, scaler, ema, done, history))
                    log.warning("%s: interrupted after step %d of %d; rerun to resume from this checkpoint",
                                self.name, done, cfg.steps)
                    interrupt.check()
        for m in self.trainable.values():
            m.eval().requires_grad_(False)
        if ema is not None:
            self._apply_ema(ema)
        if env.is_main:
            plot_history(self.run_dir / "loss.png", history, self.name)
        self._unshard()
        D.shutdown(env)
        return TrainResult(cfg.steps, resumed, history, history[-1] if history else {}, last_path,
                           time.perf_counter() - t0)

    def _unshard(self) -> None:
        """Put the FSDP copies' trained weights into the caller's modules (every process gets them all)."""
        if self._fsdp:
            for n, m in self._owners.items():
                D.gather_into(m, self.trainable[n])
                m.eval().requires_grad_(False)
        self.trainable = self._owners

    @torch.no_grad()
    def _update_ema(self, ema: dict[str, torch.Tensor], decay: float) -> None:
        for n, m in self.trainable.items():
            for k, p in m.named_parameters():
                if p.requires_grad:
                    ema[f"{n}.{k}"].mul_(decay).add_(p.detach().float(), alpha=1 - decay)

    @torch.no_grad()
    def _apply_ema(self, ema: dict[str, torch.Tensor]) -> None:
        """Put the EMA weights into the trained modules (what fit() leaves behind with ema_decay)."""
        for n, m in self.trainable.items():
            for k, p in m.named_parameters():
                key = f"{n}.{k}"
                if key in ema:
                    p.copy_(ema[key].to(p.dtype))


def plot_history(path: Path, history: list[dict[str, float]], title: str) -> Path | None:
    """Loss (and per-stage losses) against steps, as a PNG written atomically."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for key in sorted({k for h in history for k in h}):
        if key == "loss" or key.startswith("loss_"):
            ax.plot(steps, [h.get(key, float("nan")) for h in history], label=key, lw=1.8 if key == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


# ---- training scripts (`python -m ndopt.train.teacher`, the hybrid pipeline's train_sr / train_image_model) ----
def add_script_options(ap: Any, install: str) -> None:
    """The options every training script shares: `--install` (what it installs) and `--threads`."""
    ap.add_argument("--install", action="store_true", help=install)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 on a shared machine: OpenMP threads spin badly when oversubscribed)")


def start_script(args: Any) -> None:
    """Logging to the console and torch's thread count, before a training script's work."""
    from ndopt.progress import setup_logging

    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
