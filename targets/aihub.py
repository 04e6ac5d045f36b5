"""Qualcomm AI Hub: compile every graph of a bundle to a QNN context binary and profile it on a
real device, then merge the measured latencies next to the estimates; and link each component's
graphs into one QNN context binary whose graphs share their weights (compile to `qnn_dlc`, then
`submit_link_job`: how multi-shape models ship). A quantized component's graphs are submitted as
their QDQ ONNX, which AI Hub compiles to a quantized QNN model; float graphs compile to fp16.

`qai_hub` is the optional extra `ndopt[hub]`, imported only here and only when a bundle is
submitted. Without the package or without credentials (`~/.qai_hub/client.ini`, or the file
named by QAIHUB_CLIENT_INI), one line says how to configure them and lowering carries on offline.
The API token is read only to be removed: every text from AI Hub (job messages, client errors)
passes through `redact` before it reaches a log or a report, which removes the configured token by
its exact value (any length, any characters) and anything token-shaped; every log line of this
module goes through it too, and the whole result is redacted once more before it is returned.
"""

from __future__ import annotations

import configparser
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class _RedactingLog(logging.LoggerAdapter):
    """The `ndopt` logger with every message of this module formatted, then redacted: a client text
    passed as an argument cannot reach a handler unredacted."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if self.isEnabledFor(level):
            text = str(msg) % args if args else str(msg)
            kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 1  # the caller's line, not this one
            self.logger.log(level, "%s", redact(text), **kwargs)


log = _RedactingLog(logging.getLogger("ndopt"))

CONFIGURE_HINT = ("AI Hub: no credentials found (~/.qai_hub/client.ini or QAIHUB_CLIENT_INI); to compile and "
                  "profile on real devices run `qai-hub configure --api_token <TOKEN>` (pip install 'ndopt[hub]'); "
                  "continuing offline with estimates only")
MISSING_HINT = ("AI Hub: the qai-hub package is not installed (pip install 'ndopt[hub]', then `qai-hub configure "
                "--api_token <TOKEN>`); continuing offline with estimates only")
_SECRET = re.compile(r"(api_token\s*[=:]\s*)\S+|(token\s*[=:]\s*)\S+|\b[A-Za-z0-9_\-]{32,}\b", re.IGNORECASE)


def redact(text: object, secrets: Iterable[str] | None = None) -> str:
    """`text` without the configured token (by its exact value, whatever its length or characters)
    and without anything token-shaped (key=value pairs naming a token, long opaque strings).
    `secrets`: the exact values to remove; None reads them from the client config (`configured_secrets`)."""
    out = str(text)
    for secret in sorted(set(configured_secrets() if secrets is None else secrets), key=len, reverse=True):
        if secret:
            out = out.replace(secret, "<redacted>")  # plain replace: a token may hold regex metacharacters
    return _SECRET.sub(lambda m: (m.group(1) or m.group(2) or "") + "<redacted>", out)


def config_path() -> Path:
    """The client config qai-hub reads: QAIHUB_CLIENT_INI, else ~/.qai_hub/client.ini (its `get_config_path`)."""
    env = os.environ.get("QAIHUB_CLIENT_INI")
    return Path(env).expanduser() if env else Path.home() / ".qai_hub" / "client.ini"


def configured_secrets() -> tuple[str, ...]:
    """The token(s) of the client config, as written and as qai-hub reads them (configparser's `%`
    interpolation), so `redact` can remove them by value; () without a readable config."""
    try:
        text = config_path().read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ()
    found: set[str] = set()
    for line in text.splitlines():  # line by line first: a config configparser rejects still names its token
        m = re.match(r"\s*api_token\s*[=:]\s*(.*?)\s*$", line, re.IGNORECASE)
        if m:
            found.add(m.group(1))
    for interpolation in (None, configparser.BasicInterpolation()):
        parser = configparser.ConfigParser(interpolation=interpolation)
        try:
            parser.read_string(text)
            found.update(parser.get(s, "api_token") for s in parser.sections() if parser.has_option(s, "api_token"))
        except (configparser.Error, ValueError):
            continue
    found |= {t[1:-1] for t in found if len(t) > 2 and t[0] == t[-1] and t[0] in "'\""}  # quoted in the file
    return tuple(t for t in found if t.strip())


@dataclass(frozen=True)
class HubStatus:
    available: bool
    reason: str  # one line when not available

    def to_json(self) -> dict[str, Any]:
        return {"available": self.available, "reason": self.reason}


def hub_status() -> tuple[Any, HubStatus]:
    """The qai_hub module when it is installed and configured, else None and the one-line reason."""
    if not config_path().is_file():
        return None, HubStatus(False, CONFIGURE_HINT)
    try:
        import qai_hub
    except ImportError:
        return None, HubStatus(False, MISSING_HINT)
    return qai_hub, HubStatus(True, "")


@dataclass(frozen=True)
class GraphJob:
    """What to submit for one graph: its file (an .onnx, or a directory with .onnx + .data) and inputs."""

    graph: str
    model: Path
    input_specs: dict[str, tuple[tuple[int, ...], str]]
    component: str | None = None  # graphs of one component are linked into one context binary


def profile_bundle(jobs: list[GraphJob], device_name: str, options: str,
                   progress: Callable[[str], None] | None = None, link: bool = False) -> dict[str, Any]:
    """Compile and profile every graph on `device_name`; returns {"status", "graphs": {...}}.

    Per graph: compile job (QNN context binary), then a profiling inference job on the compiled
    model; measured latency (ms) and peak memory (MB) from the profile. A failed job is recorded
    for its graph and the others go on; a client/credentials failure stops with one line. Every
    text in the result is redacted (the manifest and the report carry it)."""
    return redact_all(_profile_bundle(jobs, device_name, options, progress, link))


def redact_all(value: Any, secrets: Iterable[str] | None = None) -> Any:
    """`value` (JSON-like: dicts, lists, strings, numbers) with every string value `redact`ed (keys are
    ndopt's own: graph and component names, field names)."""
    secrets = configured_secrets() if secrets is None else tuple(secrets)
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, dict):
        return {k: redact_all(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_all(v, secrets) for v in value)
    return value


def _profile_bundle(jobs: list[GraphJob], device_name: str, options: str,
                    progress: Callable[[str], None] | None, link: bool) -> dict[str, Any]:
    hub, status = hub_status()
    if hub is None:
        log.info("%s", status.reason)
        return {"status": "offline", "reason": status.reason}
    say = progress or (lambda _msg: None)
    results: dict[str, Any] = {}
    try:
        device = hub.Device(device_name)
        submitted = []
        for job in jobs:
            compile_job = hub.submit_compile_job(model=str(job.model), device=device, name=f"ndopt:{job.graph}",
                                                 input_specs=job.input_specs, options=options)
            log.info("AI Hub: compile %s submitted (%s)", job.graph, getattr(compile_job, "job_id", "?"))
            say(f"compile {job.graph}")
            submitted.append((job, compile_job))
        for job, compile_job in submitted:
            row: dict[str, Any] = {"compile_job": getattr(compile_job, "job_id", None)}
            results[job.graph] = row
            done = compile_job.wait()
            if not getattr(done, "success", False):
                row.update(status="compile_failed", message=redact(getattr(done, "message", "") or ""))
                log.warning("AI Hub: compile of %s failed: %s", job.graph, row["message"])
                continue
            target_model = compile_job.get_target_model()
            profile_job = _submit_profile(hub, target_model, device, f"ndopt:{job.graph}")
            row["profile_job"] = getattr(profile_job, "job_id", None)
            say(f"profile {job.graph}")
            done = profile_job.wait()
            if not getattr(done, "success", False):
                row.update(status="profile_failed", message=redact(getattr(done, "message", "") or ""))
                log.warning("AI Hub: profile of %s failed: %s", job.graph, row["message"])
                continue
            summary = profile_job.download_profile().get("execution_summary", {})
            row["status"] = "ok"
            row["measured_latency_ms"] = float(summary["estimated_inference_time"]) / 1000.0
            peak = summary.get("inference_memory_peak_range") or summary.get("estimated_inference_peak_memory")
            if peak is not None:
                row["measured_peak_memory_mb"] = float(max(peak) if isinstance(peak, (list, tuple)) else peak) / 2**20
            log.info("AI Hub: %s on %s: %.3f ms", job.graph, device_name, row["measured_latency_ms"])
    except Exception as e:  # the client's own errors (auth, network, quota) end the session, not the run
        reason = f"AI Hub: {_one_line(e)}; continuing offline"
        log.warning("%s", reason)
        return {"status": "failed", "reason": reason, "device": device_name, "graphs": results}
    out = {"status": "ok", "device": device_name, "graphs": results}
    if link:
        # linking comes after the measurements: its failure must not discard them
        out["links"] = _link_or_failed(hub, jobs, device, options, say)
    return out


def _one_line(e: Exception) -> str:
    """The exception's type and the first line of its redacted message."""
    first = next(iter(redact(str(e)).splitlines()), "")
    return f"{type(e).__name__}: {first}"


def _link_or_failed(hub: Any, jobs: list[GraphJob], device: Any, options: str,
                    say: Callable[[str], None]) -> dict[str, Any]:
    """`link_components`, or {"status": "failed", "reason"} when the client raises (auth, network, quota)."""
    try:
        return link_components(hub, jobs, device, options, say)
    except Exception as e:
        reason = f"AI Hub link: {_one_line(e)}; graphs stay profiled but unlinked"
        log.warning("%s", reason)
        return {"status": "failed", "reason": reason}


def dlc_options(options: str) -> str:
    """The compile options with the target runtime set to `qnn_dlc` (what a link job takes)."""
    out = re.sub(r"--target_runtime\s+\S+", "--target_runtime qnn_dlc", options)
    return out if "--target_runtime" in out else f"{out} --target_runtime qnn_dlc".strip()


def link_components(hub: Any, jobs: list[GraphJob], device: Any, options: str,
                    say: Callable[[str], None] = lambda _msg: None) -> dict[str, Any]:
    """Per component: compile each of its graphs to a QNN DLC, then one link job that builds a single
    context binary holding every graph with one copy of the shared weights. A failed compile or link
    is recorded for its component and the others go on."""
    if not callable(getattr(hub, "submit_link_job", None)):
        log.warning("AI Hub: this qai-hub client has no submit_link_job; graphs are not linked (upgrade qai-hub)")
        return {"status": "unavailable", "reason": "qai-hub client without submit_link_job"}
    by_comp: dict[str, list[GraphJob]] = {}
    for job in jobs:
        by_comp.setdefault(job.component or job.graph, []).append(job)
    out: dict[str, Any] = {}
    for comp, group in by_comp.items():
        row: dict[str, Any] = {"graphs": [j.graph for j in group], "compile_jobs": []}
        out[comp] = row
        compiled = []
        for job in group:
            cj = hub.submit_compile_job(model=str(job.model), device=device, name=f"ndopt:{job.graph}:dlc",
                                        input_specs=job.input_specs, options=dlc_options(options))
            row["compile_jobs"].append(getattr(cj, "job_id", None))
            compiled.append((job, cj))
        failed = [job.graph for job, cj in compiled if not getattr(cj.wait(), "success", False)]
        if failed:
            row.update(status="compile_failed", failed=failed)
            log.warning("AI Hub: link of %s skipped: DLC compile of %s failed", comp, failed)
            continue
        lj = hub.submit_link_job([cj.get_target_model() for _, cj in compiled], device=device, name=f"ndopt:{comp}")
        row["link_job"] = getattr(lj, "job_id", None)
        say(f"link {comp}")
        done = lj.wait()
        if not getattr(done, "success", False):
            row.update(status="link_failed", message=redact(getattr(done, "message", "") or ""))
            log.warning("AI Hub: link of %s failed: %s", comp, row["message"])
            continue
        row["status"] = "ok"
        log.info("AI Hub: %s: %d graphs linked into one context binary (job %s)", comp, len(group), row["link_job"])
    return out


def _submit_profile(hub: Any, target_model: Any, device: Any, name: str) -> Any:
    """Profiling is an inference job with profile=True in current clients (submit_profile_job before)."""
    try:
        return hub.submit_inference_job(model=target_model, device=device, name=name, profile=True)
    except TypeError:
        return hub.submit_profile_job(model=target_model, device=device, name=name)


def merge_measured(estimates: dict[str, dict[str, Any]], hub_result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per graph: the estimate and, where profiled, the measurement and estimate/measured ratio."""
    out = {g: dict(e) for g, e in estimates.items()}
    for g, row in (hub_result.get("graphs") or {}).items():
        if g in out and "measured_latency_ms" in row:
            out[g]["measured_latency_ms"] = row["measured_latency_ms"]
            out[g]["estimate_over_measured"] = round(out[g]["latency_ms"] / row["measured_latency_ms"], 4) \
                if row["measured_latency_ms"] else None
    return out
