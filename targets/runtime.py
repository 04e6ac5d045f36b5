"""The reference bundle runtime: runs a lowered bundle's `manifest.json` program end to end.

Written for an app developer porting the on-device loop: numpy, onnxruntime and tokenizers only (and
jsonschema for the manifest; no torch), one small function per host op (`HOST_OPS` in
targets/bundle.py documents each), and one loop over the program. It validates the manifest against
its schema, refuses any file it names outside the bundle directory, and verifies every graph's,
weights file's, tokenizer's and constant table's recorded sha256 before loading it. It prefers a
graph's quantized (`qdq`) form, and uses onnxruntime's QNN execution provider (HTP backend) when
`onnxruntime-qnn` is installed, else the CPU. Noise is drawn from `numpy.random.default_rng(seed)`
in program order, the stream ndopt's sampler draws when given the same numpy generator, so a
bundle and the pipeline that made it give the same video for the same prompt and seed.

    result = generate(Path("runs/x/bundles/snapdragon-8-elite"), "a red ball", seed=0)
    result.video  # [1, 3, F, H, W] float32 in [-1, 1]; result.frames: F x [H, W, 3] uint8
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ndopt.errors import LoweringError, TargetError

VERSION = 2  # the manifest version this runtime reads (targets/bundle.py VERSION)
QNN = "QNNExecutionProvider"
CPU = "CPUExecutionProvider"
PROVIDER_ALIASES = {"qnn": QNN, "cpu": CPU}
DTYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64, "bool": np.bool_}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BundleResult:
    """One generated video: normalized latents [1, C, T, h, w], the decoded video [1, 3, F, H, W] in
    [-1, 1] and its uint8 frames (None without a decoder), the execution provider the graphs ran on
    (several joined by '+'), wall seconds."""

    latents: np.ndarray
    video: np.ndarray | None
    frames: list[np.ndarray] | None
    provider: str
    seconds: float


# ---- loading ----------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def inside(bundle: Path, name: str, field: str) -> Path:
    """The bundle file a manifest field names, resolved; refused when it lies outside the bundle.

    A manifest is input like any other: an absolute name, a `..` segment or a symlink pointing out
    would make the runtime read (and hand onnxruntime or tokenizers) a file the bundle does not hold."""
    root = bundle.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise LoweringError(f"bundle {bundle}: manifest field {field} names {name!r}, which resolves to {path}, "
                            "outside the bundle; a bundle's files live in its directory: lower the pipeline again")
    return path


def verified(bundle: Path, name: str, expected: str | None, what: str, field: str) -> Path:
    """The bundle file `name` (from manifest field `field`) after checking it lies inside the bundle,
    exists and (when recorded) has the manifest's sha256."""
    path = inside(bundle, name, field)
    if not path.is_file():
        raise LoweringError(f"bundle {bundle}: {what} {name} ({field}) is missing; lower the pipeline again")
    if expected is not None and sha256(path) != expected:
        raise LoweringError(f"bundle {bundle}: {what} {name} ({field}) does not match the manifest's sha256 (changed "
                            "or corrupted after lowering); lower the pipeline again rather than editing bundle files")
    return path


def load_manifest(bundle: Path) -> dict[str, Any]:
    """`manifest.json`, checked against the schema before anything in it runs (a hand-edited manifest
    is input: its file names and program are validated like the lowering validates them)."""
    from targets.bundle import validate_manifest

    path = bundle / "manifest.json"
    try:
        man = json.loads(path.read_text())
    except FileNotFoundError:
        raise LoweringError(f"{path} does not exist: point at a bundle directory (RUN/bundles/<target>)") from None
    except json.JSONDecodeError as e:
        raise LoweringError(f"{path}: not JSON (line {e.lineno}): {e.msg}; lower the pipeline again") from None
    if man.get("version") != VERSION:
        raise LoweringError(f"{path}: manifest version {man.get('version')!r} ({man.get('format')}); this runtime "
                            f"reads version {VERSION}: lower the pipeline again with this ndopt")
    validate_manifest(man, path)
    return man


def choose_provider(provider: str | None) -> tuple[str, dict[str, str]]:
    """(execution provider, its options): QNN on the HTP when onnxruntime-qnn offers it, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    name = PROVIDER_ALIASES.get((provider or "").lower(), provider) or (QNN if QNN in available else CPU)
    if name not in available:
        raise TargetError(f"execution provider {name!r} is not in this onnxruntime ({', '.join(available)}); "
                          "install onnxruntime-qnn for QNN, or pass provider='cpu'")
    if name == QNN:  # the Hexagon NPU through QNN's HTP backend
        return name, {"backend_path": "QnnHtp.dll" if sys.platform == "win32" else "libQnnHtp.so"}
    return name, {}


# ---- the state a program runs on ---------------------------------------------------------------
@dataclass
class State:
    """Buffers named by the program, plus what the loop needs to open graphs and draw noise."""

    bundle: Path
    manifest: dict[str, Any]
    prompt: str
    rng: np.random.Generator
    provider: tuple[str, dict[str, str]]
    prefer_quantized: bool
    threads: int | None
    buffers: dict[str, np.ndarray] = field(default_factory=dict)
    lists: dict[str, list[np.ndarray]] = field(default_factory=dict)
    sessions: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, np.ndarray] = field(default_factory=dict)
    checked: set[str] = field(default_factory=set)
    providers_used: set[str] = field(default_factory=set)  # what ran, including sessions since released
    at: int = 0  # the program index being run (what errors name)

    def session(self, graph: str) -> Any:
        """The onnxruntime session of a graph (its quantized form when there is one), opened once."""
        if graph not in self.sessions:
            import onnxruntime as ort

            entry = self.manifest["graphs"].get(graph)
            if entry is None:
                raise LoweringError(f"bundle {self.bundle}: the program calls graph {graph!r}, which the manifest "
                                    f"does not list ({', '.join(self.manifest['graphs'])})")
            quantized = bool(self.prefer_quantized and entry.get("qdq"))
            key = "qdq" if quantized else "file"
            digest = entry.get("qdq_sha256") if quantized else entry["sha256"]
            path = verified(self.bundle, entry[key], digest, f"graph {graph}", f"graphs.{graph}.{key}")
            self.check_weights(entry["component"], entry.get("external_data"), f"graphs.{graph}.external_data")
            opts = ort.SessionOptions()
            if self.threads:
                opts.intra_op_num_threads = self.threads
                opts.inter_op_num_threads = 1
            ep, ep_options = self.provider
            if ep == QNN and not quantized:  # a float graph on the HTP runs its fp16 path
                ep_options = {**ep_options, "enable_htp_fp16_precision": "1"}
            providers = [(ep, ep_options)] + ([CPU] if ep != CPU else [])  # CPU takes what QNN cannot
            self.sessions[graph] = ort.InferenceSession(str(path), opts, providers=providers)
            self.providers_used.add(self.sessions[graph].get_providers()[0])
        return self.sessions[graph]

    def check_weights(self, component: str, data: str | None, field: str) -> None:
        """Verify a component's shared weights file once, whichever form (float or QDQ) of its graphs
        runs: both read the same `<component>.weights.bin` (targets/shared_weights.py)."""
        record = self.manifest.get("weights", {}).get(component) or {}
        names = {data: field} if data else {}
        if record.get("file"):
            names[record["file"]] = f"weights.{component}.file"
        for name, where in names.items():
            if name not in self.checked:
                digest = record.get("sha256") if record.get("file") in (None, name) else None
                verified(self.bundle, name, digest, f"weights of {component}", where)
                self.checked.add(name)

    def run(self, graph: str, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        """One graph call; feeds are cast to the dtypes the graph declares (int32 ids and masks)."""
        sess = self.session(graph)
        cast = {i.name: np.ascontiguousarray(feeds[i.name], dtype=DTYPES[_ort_dtype(i.type)])
                for i in sess.get_inputs()}
        return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, cast)))

    def table(self, name: str) -> np.ndarray:
        """A constant table (`manifest["constants"][name]`), checked against its sha256 when recorded;
        never unpickled (np.load's allow_pickle stays False)."""
        if name not in self.tables:
            record = self.manifest["constants"].get(name)
            if record is None:  # unlisted, it would escape the digest check below
                raise LoweringError(f"bundle {self.bundle}: program[{self.at}] reads table {name!r}, which the "
                                    f"manifest's constants do not list ({', '.join(self.manifest['constants'])}); "
                                    "lower the pipeline again")
            path = verified(self.bundle, name, record.get("sha256"), "constant", f"constants.{name}")
            self.tables[name] = np.load(path, allow_pickle=False)
        return self.tables[name]


def _ort_dtype(t: str) -> str:
    return {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int32)": "int32",
            "tensor(int64)": "int64", "tensor(bool)": "bool"}[t]


# ---- resampling (torch.nn.functional.interpolate's conventions, over [B, C, T, H, W]) -----------
def _bilinear_axis(x: np.ndarray, out: int, axis: int, align_corners: bool) -> np.ndarray:
    n = x.shape[axis]
    dst = np.arange(out, dtype=np.float32)
    if align_corners:
        src = dst * np.float32((n - 1) / (out - 1) if out > 1 else 0.0)
    else:  # half-pixel centres, clamped at 0 (torch's area_pixel_compute_source_index)
        src = np.maximum((dst + np.float32(0.5)) * np.float32(n / out) - np.float32(0.5), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    lam = (src - i0).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = out
    lam = lam.reshape(shape)
    return np.take(x, i0, axis=axis) * (1 - lam) + np.take(x, i1, axis=axis) * lam


def resize(x: np.ndarray, size: list[int], interpolation: dict[str, Any]) -> np.ndarray:
    """Resize the last two axes to `size` (bilinear without antialias, or legacy nearest)."""
    h, w = size
    if interpolation["mode"] == "nearest":  # src = floor(dst * in / out)
        ih = np.minimum(np.floor(np.arange(h) * (x.shape[-2] / h)).astype(np.int64), x.shape[-2] - 1)
        iw = np.minimum(np.floor(np.arange(w) * (x.shape[-1] / w)).astype(np.int64), x.shape[-1] - 1)
        return x[..., ih[:, None], iw[None, :]]
    if interpolation["mode"] != "bilinear" or interpolation.get("antialias"):
        raise LoweringError(f"interpolation {interpolation} is not one the runtime implements (bilinear, nearest)")
    ac = bool(interpolation["align_corners"])
    return _bilinear_axis(_bilinear_axis(x, h, x.ndim - 2, ac), w, x.ndim - 1, ac).astype(x.dtype)


# ---- host ops (one function each; the manifest's fields are their parameters) -----------------
def tokenize(s: State, op: dict[str, Any]) -> None:
    from tokenizers import Tokenizer

    for i, enc in enumerate(op["encoders"]):
        digest = s.manifest["assets"].get(enc["tokenizer"], {}).get("sha256")
        tok = Tokenizer.from_file(str(verified(s.bundle, enc["tokenizer"], digest, "tokenizer",
                                               f"program[{s.at}].encoders[{i}].tokenizer")))
        if enc["truncation"]:
            tok.enable_truncation(enc["max_length"], direction=enc["truncation_side"])
        tok.enable_padding(direction=enc["padding_side"], pad_id=enc["pad_id"], pad_token=enc["pad_token"],
                           length=enc["max_length"])
        for text in op["texts"]:
            e = tok.encode((s.prompt if text["text"] is None else text["text"]) + text["suffix"],
                           add_special_tokens=enc["add_special_tokens"])
            prefix = f"{op['output']}.{text['name']}"
            s.buffers[f"{prefix}.{enc['ids']}"] = np.array([e.ids], dtype=DTYPES[enc["dtype"]])
            if enc["mask"]:
                s.buffers[f"{prefix}.{enc['mask']}"] = np.array([e.attention_mask], dtype=DTYPES[enc["dtype"]])


def init_noise(s: State, op: dict[str, Any]) -> None:
    noise = s.rng.standard_normal(tuple(op["shape"]), dtype=np.float32)
    for size in op["downsample"]:
        noise = resize(noise, size, op["interpolation"]) * np.float32(op["gain"])
    s.buffers[op["output"]] = noise


def frame_start(s: State, op: dict[str, Any]) -> None:
    index = [slice(None)] * s.buffers[op["input"]].ndim
    index[op["axis"]] = slice(op["first"], op["first"] + op["frames"])
    s.buffers[op["output"]] = s.buffers[op["input"]][tuple(index)]


def history(s: State, op: dict[str, Any]) -> None:
    level = np.concatenate(s.lists[op["input"]], axis=op["axis"])
    pyramid = [level]
    for size in op["sizes"]:  # each level from the one above it (upstream get_pyramid_latent)
        level = resize(level, size, op["interpolation"])
        pyramid.append(level)
    s.lists[op["output"]] = pyramid[::-1]  # index = stage


def block_noise(rng: np.random.Generator, shape: tuple[int, ...], cholesky: np.ndarray) -> np.ndarray:
    """N(0, I) rows of 4 through the Cholesky factor, each row one 2x2 block (sampler.block_noise)."""
    b, c, t, h, w = shape
    z = rng.standard_normal((b, c * t * (h // 2) * (w // 2), 4), dtype=np.float32).reshape(-1, 4) @ cholesky.T
    z = z.reshape(b, c, t, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 3, 5, 4, 6)
    return z.reshape(b, c, t, h, w)


def stage_start(s: State, op: dict[str, Any]) -> None:
    for k in [k for k in s.buffers if k.startswith(f"{op['output']}[")]:
        del s.buffers[k]
    for i, clip in enumerate(op["history"]):
        level = s.lists[op["input"]][clip["stage"]]
        s.buffers[f"{op['output']}[{i}]"] = level[:, :, clip["first"]:clip["first"] + clip["frames"]]
    latents = s.buffers["latents"]
    if op["resample"]:
        latents = resize(latents, op["resample"]["size"], op["resample"])
    if op["renoise"]:
        r = op["renoise"]
        if r["block"] != 2:
            raise LoweringError(f"renoise block {r['block']}: the runtime implements 2x2 blocks")
        chol = np.asarray(r["cholesky"], dtype=DTYPES[r["dtype"]])
        latents = np.float32(r["alpha"]) * latents + np.float32(r["beta"]) * block_noise(s.rng, latents.shape, chol)
    s.buffers["latents"] = latents


def _source(s: State, src: Any, shape: list[int], dtype: Any) -> np.ndarray:
    if isinstance(src, str):
        return s.buffers[src]
    if "concat" in src:
        return np.concatenate([s.buffers[b] for b in src["concat"]], axis=0)
    if "fill" in src:
        return np.full(shape, src["fill"], dtype=dtype)
    if "value" in src:
        return np.asarray(src["value"], dtype=dtype)
    row = s.table(src["table"])[src["row"]]
    return np.broadcast_to(row, (shape[0], *row.shape))


def _feeds(s: State, graph: str, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """A graph call's inputs from their sources (buffers, concatenations, fills, values, table rows),
    shaped and typed as the graph declares them."""
    specs = {i.name: (i.shape, DTYPES[_ort_dtype(i.type)]) for i in s.session(graph).get_inputs()}
    return {name: _source(s, src, *specs[name]) for name, src in inputs.items()}


def denoise_step(s: State, op: dict[str, Any]) -> None:
    v = {}
    for call in op["calls"]:
        v[call["prompt"]] = s.run(op["graph"], _feeds(s, op["graph"], call["inputs"]))[call["output"]].astype(np.float32)
    g = op["guidance"]
    if g["mode"] == "cfg_batched":
        v["uncond"], v["cond"] = np.split(v.pop("uncond+cond"), 2, axis=0)
    if g["mode"] == "none":
        velocity = v["cond"]
    else:  # classifier-free guidance
        velocity = v["uncond"] + np.float32(g["scale"]) * (v["cond"] - v["uncond"])
    s.buffers["latents"] = (s.buffers["latents"] + np.float32(op["dt"]) * velocity).astype(np.float32)


def frame_end(s: State, op: dict[str, Any]) -> None:
    s.lists.setdefault(op["output"], []).append(s.buffers[op["input"]])


def denormalize(s: State, op: dict[str, Any]) -> None:
    z = np.concatenate(s.lists[op["input"]], axis=op["axis"])
    k = op["first_frames"]
    first, rest = np.split(z, [k], axis=op["axis"])
    first = first / np.float32(op["image"]["scale"]) + np.float32(op["image"]["shift"])
    rest = rest / np.float32(op["video"]["scale"]) + np.float32(op["video"]["shift"])
    s.buffers[op["output"]] = np.concatenate([first, rest], axis=op["axis"]).astype(np.float32)


def call(s: State, op: dict[str, Any]) -> None:
    if "count" in op:
        raise LoweringError(f"bundle {s.bundle}: its program is a call list without the sampler's loop (graph "
                            f"{op['graph']} x{op['count']}); the reference runtime runs Pyramid-Flow programs")
    outs = s.run(op["graph"], {name: s.buffers[buf] for name, buf in op["inputs"].items()})
    for name, buf in op["outputs"].items():
        s.buffers[buf] = outs[name]


def postprocess(s: State, op: dict[str, Any]) -> None:
    lo, hi = op["clamp"]
    video = np.clip(s.buffers[op["input"]], lo, hi)
    s.buffers[op["input"]] = video
    v = np.round((video[0] + np.float32(op["offset"])) * np.float32(op["scale"])).astype(DTYPES.get(op["dtype"], np.uint8))
    s.lists[op["output"]] = [v[:, f].transpose(1, 2, 0) for f in range(v.shape[1])]


def external_first_frame(s: State, op: dict[str, Any]) -> None:
    raise LoweringError(f"bundle {s.bundle}: the first latent frame comes from an external image model (hybrid "
                        "mode), which this bundle does not hold")


def lcm_init(s: State, op: dict[str, Any]) -> None:
    s.buffers[op["output"]] = s.rng.standard_normal(tuple(op["shape"]), dtype=np.float32) * np.float32(op["sigma"])


def lcm_step(s: State, op: dict[str, Any]) -> None:
    out = s.run(op["graph"], _feeds(s, op["graph"], op["inputs"]))[op["output_name"]].astype(np.float32)
    latents = s.buffers[op["latents"]]
    x0 = np.float32(op["x0"]["sample"]) * latents + np.float32(op["x0"]["output"]) * out
    denoised = (np.float32(op["c_out"]) * x0 + np.float32(op["c_skip"]) * latents).astype(np.float32)
    nxt = op["next"]
    if nxt is None:
        s.buffers[op["latents"]] = denoised
        return
    noise = s.rng.standard_normal(denoised.shape, dtype=np.float32)
    s.buffers[op["latents"]] = (np.float32(nxt["alpha"]) * denoised + np.float32(nxt["sigma"]) * noise).astype(np.float32)


def encode_first_frame(s: State, op: dict[str, Any]) -> None:
    image = s.buffers[op["input"]].astype(np.float32)  # [1, 3, 1, H, W]
    k = int(op["factor"])
    if op["interpolation"]["mode"] != "area":
        raise LoweringError(f"interpolation {op['interpolation']} is not one encode_first_frame implements (area)")
    b, c, f, h, w = image.shape
    small = image.reshape(b, c, f, h // k, k, w // k, k).mean(axis=(4, 6), dtype=np.float32)
    z = s.run(op["graph"], {op["input_name"]: small})[op["output_name"]].astype(np.float32)
    n = op["normalize"]
    s.lists[op["output"]] = [((z - np.float32(n["shift"])) * np.float32(n["scale"])).astype(np.float32)]


def per_frame(s: State, op: dict[str, Any]) -> None:
    lo, hi = op["clamp"]  # the decoded video is clamped before upscaling, the upscaled one after
    x = np.clip(s.buffers[op["input"]], lo, hi)
    outs = []
    for f in range(int(op["frames"])):
        index = [slice(None)] * x.ndim
        index[op["axis"]] = slice(f, f + 1)
        outs.append(s.run(op["graph"], {op["input_name"]: x[tuple(index)]})[op["output_name"]])
    s.buffers[op["output"]] = np.clip(np.concatenate(outs, axis=op["axis"]).astype(np.float32), lo, hi)


def release(s: State, op: dict[str, Any]) -> None:
    """The end of a memory-plan phase: its components' sessions (and their weights) are freed."""
    gone = set(op["components"])
    for graph in [g for g in s.sessions if s.manifest["graphs"][g]["component"] in gone]:
        del s.sessions[graph]


HANDLERS: dict[str, Callable[[State, dict[str, Any]], None]] = {
    "tokenize": tokenize, "init_noise": init_noise, "frame_start": frame_start, "history": history,
    "stage_start": stage_start, "denoise_step": denoise_step, "frame_end": frame_end, "denormalize": denormalize,
    "call": call, "postprocess": postprocess, "external_first_frame": external_first_frame,
    "lcm_init": lcm_init, "lcm_step": lcm_step, "encode_first_frame": encode_first_frame, "per_frame": per_frame,
    "release": release,
}


# ---- the loop -----------------------------------------------------------------------------------
def generate(bundle_dir: Path, prompt: str, *, seed: int = 0, provider: str | None = None,
             prefer_quantized: bool = True, progress: Progress | None = None,
             threads: int | None = None) -> BundleResult:
    """Run the bundle's program for one prompt: tokenize, encode, denoise every frame and stage, decode.

    `provider`: None picks QNN when available, else CPU ('qnn', 'cpu' or a full provider name force
    one); `threads`: onnxruntime intra-op threads (its default when None)."""
    t0 = time.perf_counter()
    bundle = Path(bundle_dir)
    man = load_manifest(bundle)
    s = State(bundle, man, prompt, np.random.default_rng(seed), choose_provider(provider), prefer_quantized, threads)
    steps = sum(op["op"] == "denoise_step" for op in man["program"])
    for i, op in enumerate(man["program"]):
        handler = HANDLERS.get(op.get("op"))
        if handler is None:
            raise LoweringError(f"bundle {bundle}: program[{i}] has op {op.get('op')!r}, not one of "
                                f"{', '.join(HANDLERS)}; lower the pipeline again with this ndopt")
        s.at = i
        handler(s, op)
        if progress is not None and op["op"] == "denoise_step":
            progress(f"step {op['index'] + 1}/{steps} (frame {op['unit'] + 1}, stage {op['stage'] + 1})")
    used = "+".join(sorted(s.providers_used)) or s.provider[0]  # sessions of ended phases are freed
    post = next((op for op in man["program"] if op["op"] == "postprocess"), None)
    video = s.buffers[post["input"]] if post else None
    frames = s.lists[post["output"]] if post else None
    return BundleResult(np.concatenate(s.lists["generated"], axis=2), video, frames, used,
                        round(time.perf_counter() - t0, 3))


__all__ = ["HANDLERS", "BundleResult", "generate", "load_manifest", "resize"]
