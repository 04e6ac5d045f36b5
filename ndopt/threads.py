"""How many intra-op threads torch gets for a piece of work: one place, used by every phase.

OpenMP workers that find their cores taken spin instead of working: on a shared machine a small
model's forward with two threads can run several times slower than with one, while on quiet cores
the second thread helps a little. So the count follows the work's size and how busy the machine is
right now (other processes' CPU use over a short window, cached for a few seconds):

- `NDOPT_THREADS` (or `ndopt --threads N`) overrides everything; `OMP_NUM_THREADS` caps the count;
- the cores this process may use (affinity) minus the cores other processes keep busy, at least 1;
- work under `SMALL_BYTES` of weights gets at most `SMALL_MAX` threads, and only on idle cores.

`for_work(...)` is a context manager that sets torch's count and restores it afterwards.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

SMALL_BYTES = 64 * 2**20  # below this a component's ops are too small to split well
SMALL_MAX = 2
BUSY_WINDOW_S = 0.05
BUSY_TTL_S = 5.0
ENV = "NDOPT_THREADS"

_override: int | None = None
_busy: tuple[float, float] | None = None  # (when measured, cores kept busy by other processes)


def set_override(n: int | None) -> None:
    """A fixed thread count for every piece of work (the CLI's `--threads`); None: decide per work."""
    global _override
    if n is not None and n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    _override = n


def override() -> int | None:
    if _override is not None:
        return _override
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        from ndopt.errors import InputError

        raise InputError(f"{ENV}={raw!r}: must be a positive integer (torch intra-op threads)")
    return int(raw)


def cores() -> int:
    """CPUs this process may run on."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    cap = os.environ.get("OMP_NUM_THREADS", "").strip()
    return max(1, min(n, int(cap))) if cap.isdigit() and int(cap) > 0 else max(1, n)


def busy_cores() -> float:
    """Cores other processes keep busy: the machine's CPU time over a short window minus this
    process's own (measured while this thread sleeps), cached for `BUSY_TTL_S`."""
    global _busy
    now = time.monotonic()
    if _busy is not None and now - _busy[0] < BUSY_TTL_S:
        return _busy[1]
    import psutil

    def used() -> tuple[float, float]:
        t = psutil.cpu_times()
        total = sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))
        own = psutil.Process().cpu_times()
        return total, own.user + own.system

    try:
        a, oa = used()
        t0 = time.perf_counter()
        time.sleep(BUSY_WINDOW_S)
        b, ob = used()
        dt = time.perf_counter() - t0
        others = max(0.0, ((b - a) - (ob - oa)) / dt)
    except (OSError, psutil.Error):  # no /proc (sandboxes): assume quiet
        others = 0.0
    _busy = (time.monotonic(), others)
    return others


def choose(work_bytes: int | None = None) -> int:
    """Threads for a piece of work whose weights take `work_bytes` (None: large)."""
    fixed = override()
    if fixed is not None:
        return fixed
    n = cores()
    if n == 1:
        return 1
    free = max(1, int(n - busy_cores() + 0.25))  # a core 75% idle counts as free
    if work_bytes is not None and work_bytes < SMALL_BYTES:
        return min(free, SMALL_MAX) if free >= n else 1
    return min(free, n)


@contextlib.contextmanager
def for_work(work_bytes: int | None = None, n: int | None = None) -> Iterator[int]:
    """torch's intra-op threads set for one piece of work (`n` if given, else `choose(work_bytes)`),
    restored afterwards; yields the count."""
    import torch

    want = n if n is not None else choose(work_bytes)
    before = torch.get_num_threads()
    if want != before:
        torch.set_num_threads(want)
    try:
        yield want
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def for_pipeline(pipeline: Any) -> contextlib.AbstractContextManager[int]:
    """Threads for running a pipeline: sized by its largest component on the CPU (a GPU pipeline's
    host threads only launch kernels: one suffices)."""
    from ndopt.precision import weight_bytes

    comps = [c for c in pipeline.components.values() if c.device.type != "meta"]
    if comps and all(c.device.type == "cuda" for c in comps):
        return for_work(n=override() or 1)
    largest = max((weight_bytes(c.module, skip_meta=True) for c in comps if c.device.type == "cpu"), default=0)
    return for_work(largest)


def for_module(module: Any) -> contextlib.AbstractContextManager[int]:
    from ndopt.precision import weight_bytes

    return for_work(weight_bytes(module, skip_meta=True))
