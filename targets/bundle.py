"""The bundle an on-device runtime follows: graphs, tokenizer files and `manifest.json`.

The manifest says which graph to call, when (frame, stage, step), with which constants and on which
buffers; what each graph takes and returns; and a memory plan. For Pyramid-Flow the program is the
sampler's loop written out with the frontend's own schedule math (`sampler.unroll`), as a list of
host ops from a closed set (`HOST_OPS`) whose fields carry every parameter the runtime needs
(interpolation modes, renoise coefficients and the block-noise Cholesky factor, tokenizer files and
padding, latent normalisation, ...): `targets.runtime` executes it with numpy and onnxruntime only.
Every manifest is validated against `manifest.schema.json` before it is written. Other samplers get
a call list (graph and count) without the loop.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ndopt.errors import LoweringError

if TYPE_CHECKING:  # torch-free at import: the reference runtime validates manifests through this module
    from ndopt.ir.pipeline import Pipeline
    from targets.lowering import GraphPlan

VERSION = 2
FORMAT = f"ndopt-bundle/{VERSION}"
SCHEMA = "manifest.schema.json"  # package data beside this module (JSON Schema, draft 2020-12)
TIMESTEP_TABLE = "timestep_embedding.npy"  # a folded schedule's timestep-MLP rows, [rows, D] float32

# The host ops a program is made of (a closed set: the schema refuses any other). Their fields carry
# the parameters; these lines are documentation for people reading a manifest.
HOST_OPS = {
    "tokenize": "each text (the user's prompt + suffix, or a fixed one) through each tokenizer file: "
                "ids (and mask) padded/truncated to max_length -> tokens.<text>.<input>",
    "init_noise": "N(0, I) of `shape` from the bundle's RNG, then resized to each `downsample` size "
                  "(interpolation) and multiplied by `gain` -> noise at stage 0's resolution",
    "frame_start": "latents = input[first:first+frames] along `axis` (this autoregressive unit's noise)",
    "history": "pyramid of the generated frames (concatenated on `axis`): full size, then resized to "
               "each of `sizes` in turn (interpolation) -> pyramid[stage]",
    "stage_start": "history[i] = pyramid[stage_i][first_i:first_i+frames_i]; at stage > 0: latents = "
                   "resample(latents), then alpha * latents + beta * block noise (N(0, I) x cholesky^T "
                   "over each block x block patch)",
    "denoise_step": "one Euler step: v from the graph (per call; guidance `cfg`: v_u + scale (v_c - v_u), "
                    "`cfg_batched`: one call on concatenated inputs, split on the batch); latents += dt * v",
    "frame_end": "append latents to the generated frames",
    "denormalize": "concatenate generated frames on `axis`; first `first_frames`: z / image.scale + "
                   "image.shift; later frames: z / video.scale + video.shift",
    "call": "run a graph on named buffers (or `count` times per video, for samplers without a program)",
    "postprocess": "clamp the decoded video, then (x + offset) * scale rounded half to even -> uint8 frames",
    "external_first_frame": "hybrid mode: the first latent frame comes from an image model outside the bundle",
    "lcm_init": "the image model's initial latents: N(0, I) of `shape` from the bundle's RNG times `sigma`",
    "lcm_step": "one LCM step of the image model: out = graph(inputs); x0 = x0.sample * latents + x0.output * out; "
                "denoised = c_out * x0 + c_skip * latents; then, unless last, latents = next.alpha * denoised + "
                "next.sigma * N(0, I) (else latents = denoised)",
    "encode_first_frame": "hybrid mode: the image model's frame area-downsampled by `factor`, encoded by the VAE "
                          "encoder graph, normalized (z - shift) * scale: the first generated latent frame",
    "per_frame": "run a graph on each frame of `input` along `axis` (super-resolution), concatenated -> output; "
                 "the input is clamped to `clamp` before and the output after",
    "release": "free the sessions (weights) of these components: the memory plan's phase ended",
}

# The tokenizers behind the text encoder's graph inputs (`SD3TextEncoder.tokenize`, also DT5's):
# (tokenizer attribute, ids input, mask input or None, config field with the padded length). A text
# encoder that tokenizes otherwise (miniFLUX: no CLIP-G) names its own in `tokenizer_inputs`.
TEXT_INPUTS = (("tokenizer_3", "t5_ids", "t5_mask", "max_sequence_length"),
               ("tokenizer", "clip_l_ids", None, "clip_max_length"),
               ("tokenizer_2", "clip_g_ids", None, "clip_max_length"))
INTERPOLATION_BILINEAR = {"mode": "bilinear", "align_corners": False, "antialias": False}
INTERPOLATION_NEAREST = {"mode": "nearest"}  # torch's legacy 'nearest': src = floor(dst * in / out)
RNG = "numpy.random.default_rng(seed).standard_normal(shape, dtype=float32), one stream, in program order"


def text_inputs(text_encoder: Any) -> tuple[tuple[str, str, str | None, str], ...]:
    """The tokenizers behind a text encoder's graph inputs: its own `tokenizer_inputs`, else SD3's."""
    return tuple(getattr(text_encoder, "tokenizer_inputs", TEXT_INPUTS))


def tokenizer_file(attr: str) -> str:
    """Where a tokenizer lives in the bundle (upstream's subdirectory names)."""
    return f"{attr}/tokenizer.json"


def graph_index(plans: list[GraphPlan]) -> dict[tuple[str, str], str]:
    """(component, call-plan key) -> graph name (deduplicated signatures share a graph)."""
    return {(p.component, k): p.name for p in plans for k in p.keys}


def program(pipeline: Pipeline, plans: list[GraphPlan]) -> list[dict[str, Any]]:
    """The runtime's call list for a pipeline (the sampler's loop when the model interface's sampler math
    knows the pipeline's sampler)."""
    from ndopt.model import interface_for

    math = interface_for(pipeline).sampler
    if math is not None and math.is_sampler(pipeline.sampler):
        try:
            return pyramid_flow_program(pipeline, graph_index(plans))
        except KeyError as e:
            raise LoweringError(f"the program needs a graph for {e.args[0]} (component, call signature) that was "
                                f"not lowered; lowered: {sorted(p.name for p in plans)}; the sampler's call plan "
                                "and its loop disagree") from None
    return [{"op": "call", "graph": p.name, "component": p.component, "count": p.calls_per_video} for p in plans]


def _encoder(tok: Any, file: str, ids: str, mask: str | None, max_length: int, inputs: dict[str, Any]) -> dict[str, Any]:
    """One tokenizer of a tokenize op: how the runtime pads and truncates, as the tokenizer does."""
    from targets.lowering import boundary_dtype

    return {"tokenizer": file, "ids": ids, "mask": mask, "max_length": int(max_length), "padding": "max_length",
            "padding_side": tok.padding_side, "pad_id": int(tok.pad_token_id), "pad_token": tok.pad_token,
            "truncation": True, "truncation_side": tok.truncation_side, "add_special_tokens": True,
            "dtype": boundary_dtype(inputs[ids].spec.dtype) if ids in inputs else "int32"}


def _tokenize_op(pipeline: Pipeline, guided: bool) -> dict[str, Any]:
    te = pipeline.by_role("text_encoder")[0]
    smp, cfg = pipeline.sampler, te.module.config
    toks = getattr(te.module, "tokenizers", None)
    if toks is None:
        raise LoweringError(f"component {te.name!r} has no tokenizers, so the bundle cannot tokenize prompts; load "
                            "the text encoder with its tokenizers (tiny_tokenizers() or from_pretrained_dir)")
    inputs = {p.name: p for p in te.inputs}
    encoders = [_encoder(getattr(toks, attr), tokenizer_file(attr), ids, mask, getattr(cfg, length), inputs)
                for attr, ids, mask, length in text_inputs(te.module)]
    made = {e["ids"] for e in encoders} | {e["mask"] for e in encoders if e["mask"]}
    if set(inputs) - made:
        raise LoweringError(f"text encoder {te.name!r} takes {sorted(inputs)}; the tokenize op makes {sorted(made)} "
                            "(targets.bundle.TEXT_INPUTS): teach TEXT_INPUTS the encoder's tokenization")
    texts = [{"name": "cond", "text": None, "suffix": smp.prompt_suffix}]  # text None: the user's prompt
    if guided:  # upstream: the negative prompt without the suffix
        texts.insert(0, {"name": "uncond", "text": smp.negative_prompt, "suffix": ""})
    return {"op": "tokenize", "texts": texts, "encoders": encoders, "output": "tokens"}


def pyramid_flow_program(pipeline: Pipeline, graphs: dict[tuple[str, str], str]) -> list[dict[str, Any]]:
    """The sampler's loop (`PyramidFlowSampler.sample` then `.decode`) written out with its constants.

    The denoising steps come from the frontend's own `unroll` (timestep or folded-table row, sigmas,
    guidance, renoise; the model interface's sampler math), so the manifest and the sampler cannot drift
    apart."""
    from ndopt.model import sampler_math

    m = sampler_math(pipeline)
    stage_hw, history_clips = m.stage_hw, m.history_clips
    sch = pipeline.schedule
    guided = sch.guidance.mode != "none"
    hybrid = sch.first_frame == "image-model"
    prog: list[dict[str, Any]] = image_model_program(pipeline, graphs) if hybrid else []
    text = pipeline.by_role("text_encoder")
    prompts = ["uncond", "cond"] if guided else ["cond"]
    if text:
        te = text[0]
        prog.append(_tokenize_op(pipeline, guided))
        for which in prompts:
            prog.append({"op": "call", "graph": graphs[(te.name, "prompt")], "component": te.name,
                         "inputs": {p.name: f"tokens.{which}.{p.name}" for p in te.inputs},
                         "outputs": {p.name: f"text.{which}.{p.name}" for p in te.outputs}})
    dit = pipeline.by_role("dit")[0]
    folded = m.folded_time(dit)
    n_stages = len(sch.stages)
    sizes = [list(stage_hw(sch, s)) for s in range(n_stages)]
    h, w = sizes[-1]
    prog.append({"op": "init_noise", "shape": [1, int(dit.module.config.in_channels), sch.latent_frames, h, w],
                 "dtype": "float32", "rng": RNG, "downsample": sizes[-2::-1], "interpolation": INTERPOLATION_BILINEAR,
                 "gain": 2.0, "output": "noise"})  # upstream: x2 per halving keeps unit variance
    fpu = sch.temporal.frame_per_unit
    if sch.first_frame == "external":
        prog.append({"op": "external_first_frame", "output": "generated[0]",
                     "note": "hybrid mode: the first latent frame comes from an image model outside this bundle"})
    calls = m.unroll(pipeline)
    batched = sch.guidance.mode == "cfg_batched"
    branches = ["uncond", "cond"] if sch.guidance.mode == "cfg" else ["uncond+cond" if batched else "cond"]
    velocity = dit.outputs[0].name
    for n, c in enumerate(calls):
        unit, s = c["unit"], c["stage"]
        if n == 0 or calls[n - 1]["unit"] != unit:
            if n:
                prog.append({"op": "frame_end", "unit": calls[n - 1]["unit"], "input": "latents",
                             "output": "generated"})
            first = (unit - 1) * fpu if hybrid else 0 if unit == 0 else 1 + (unit - 1) * fpu  # upstream's i2v
            prog.append({"op": "frame_start", "unit": unit, "first": first,
                         "frames": 1 if unit == 0 else fpu, "axis": 2, "input": "noise", "output": "latents"})
            if unit:
                prog.append({"op": "history", "unit": unit, "input": "generated", "axis": 2,
                             "sizes": sizes[-2::-1], "interpolation": INTERPOLATION_BILINEAR, "output": "pyramid"})
        clips = history_clips(unit, s, n_stages, fpu)
        if c["step"] == 0:
            entry: dict[str, Any] = {
                "op": "stage_start", "unit": unit, "stage": s, "size": sizes[s],
                "history": [{"first": f0, "frames": k, "stage": st} for f0, k, st in clips],
                "input": "pyramid", "output": "history", "resample": None, "renoise": None}
            if s > 0:
                entry["resample"] = {"size": sizes[s], **INTERPOLATION_NEAREST}
            if c["renoise"]:
                chol = m.block_noise_cholesky(sch.gamma).double()  # float32 values, exact in JSON
                entry["renoise"] = {"alpha": c["renoise"][0], "beta": c["renoise"][1], "gamma": sch.gamma,
                                    "block": 2, "cholesky": chol.tolist(), "dtype": "float32"}
            prog.append(entry)
        samples = [f"history[{i}]" for i in range(len(clips))] + ["latents"]
        time_input: dict[str, Any] = ({"timestep_embedding": {"table": TIMESTEP_TABLE, "row": c["timestep_row"]}}
                                      if folded else {"timestep_ratio": {"fill": c["timestep"]}})
        graph_calls = []
        for which in branches:
            srcs = ["uncond", "cond"] if batched else [which]

            def buf(name: str, srcs: list[str] = srcs) -> Any:
                return {"concat": [name.format(x) for x in srcs]} if batched else name.format(srcs[0])

            graph_calls.append({"prompt": which, "output": velocity, "inputs": {
                **{f"sample_{k}": ({"concat": [v, v]} if batched else v) for k, v in enumerate(samples)},
                "encoder_hidden_states": buf("text.{}.prompt_embeds"),
                "encoder_attention_mask": buf("text.{}.prompt_attention_mask"),
                "pooled_projections": buf("text.{}.pooled_projections"), **time_input}})
        prog.append({"op": "denoise_step", "index": n, "unit": unit, "stage": s, "step": c["step"],
                     "graph": graphs[(dit.name, c["dit_signature"])], "component": dit.name,
                     "timestep": c["timestep"], "sigma": c["sigma"], "sigma_next": c["sigma_next"], "dt": c["dt"],
                     "guidance": {"mode": c["guidance"], "scale": c["guidance_scale"]}, "calls": graph_calls})
    if calls:
        prog.append({"op": "frame_end", "unit": calls[-1]["unit"], "input": "latents", "output": "generated"})
    dec = pipeline.by_role("vae_decoder")
    if dec:
        prog.append({"op": "denormalize", "input": "generated", "axis": 2, "output": "z", "first_frames": 1,
                     "image": {"scale": m.image_scale, "shift": m.image_shift},
                     "video": {"scale": m.video_scale, "shift": m.video_shift}})
        out = dec[0].outputs[0].name
        prog.append({"op": "call", "graph": graphs[(dec[0].name, "video")], "component": dec[0].name,
                     "inputs": {"z": "z"}, "outputs": {p.name: p.name for p in dec[0].outputs}})
        for sr in pipeline.by_role("super_resolution"):  # per frame, as the sampler upscales
            prog.append({"op": "per_frame", "graph": graphs[(sr.name, "frame")], "component": sr.name,
                         "input": out, "axis": 2, "input_name": sr.inputs[0].name, "output_name": sr.outputs[0].name,
                         "frames": m.frame_count(sch.latent_frames), "output": "upscaled", "clamp": [-1.0, 1.0]})
            out = "upscaled"
        prog.append({"op": "postprocess", "input": out, "output": "frames", "clamp": [-1.0, 1.0],
                     "offset": 1.0, "scale": 127.5, "round": "half_to_even", "dtype": "uint8",
                     "layout": "[1, 3, F, H, W] -> F x [H, W, 3]"})
    if getattr(pipeline.sampler, "memory_policy", "auto") == "sequential":
        prog = with_releases(prog)
    return prog


def with_releases(prog: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The program with a `release` op after each component's last use: the memory plan's sequential
    phases (each phase's weights are loaded at its first call and freed when it ends)."""
    last: dict[str, int] = {}
    for i, op in enumerate(prog):
        if op.get("component"):
            last[op["component"]] = i
    out: list[dict[str, Any]] = []
    for i, op in enumerate(prog):
        out.append(op)
        done = [c for c, j in last.items() if j == i]
        if done:
            out.append({"op": "release", "components": done})
    return out


def image_model_program(pipeline: Pipeline, graphs: dict[tuple[str, str], str]) -> list[dict[str, Any]]:
    """The hybrid pipeline's first frame (HybridSampler.first_frame + encode_first_frame) written out:
    tokenize, the image text encoders, LCM's steps with diffusers' LCMScheduler constants, the image
    decoder, then the VAE encoder on the downsampled frame -> the first generated latent frame."""
    from ndopt.model import interface_for

    model = interface_for(pipeline)
    m = model.require("sampler", "hybrid", user="the bundle's hybrid program").sampler
    sch, smp = pipeline.schedule, pipeline.sampler
    cfg = smp.image
    te, unet, dec = (pipeline[n] for n in model.image_components)
    enc = pipeline["vae_encoder"]
    toks = getattr(te.module, "tokenizers", None)
    if toks is None:
        raise LoweringError(f"component {te.name!r} has no tokenizers, so the bundle cannot tokenize prompts")
    inputs = {p.name: p for p in te.inputs}
    encoders = [_encoder(tok, tokenizer_file(f"image_{attr}"), ids, None, cfg.clip_max_length, inputs)
                for tok, attr, ids in zip(toks, ("tokenizer", "tokenizer_2"), ("clip_l_ids", "clip_g_ids"))]
    prog: list[dict[str, Any]] = [
        {"op": "tokenize", "texts": [{"name": "image", "text": None, "suffix": ""}], "encoders": encoders,
         "output": "image_tokens"},
        {"op": "call", "graph": graphs[(te.name, "prompt")], "component": te.name,
         "inputs": {p.name: f"image_tokens.image.{p.name}" for p in te.inputs},
         "outputs": {p.name: f"image_text.{p.name}" for p in te.outputs}}]
    oh, ow = sch.height * smp.sr_scale, sch.width * smp.sr_scale
    lh, lw = cfg.latent_size(oh, ow)
    shape = [1, int(cfg.unet["in_channels"]), lh, lw]
    scheduler = cfg.make_scheduler()
    scheduler.set_timesteps(timesteps=list(cfg.timesteps))
    steps = [int(t) for t in scheduler.timesteps]
    prog.append({"op": "lcm_init", "shape": shape, "dtype": "float32", "rng": RNG,
                 "sigma": float(scheduler.init_noise_sigma), "output": "image_latents"})
    acp = scheduler.alphas_cumprod
    kind = scheduler.config.prediction_type
    for i, t in enumerate(steps):
        a, b = float(acp[t].sqrt()), float((1 - acp[t]).sqrt())
        x0 = {"epsilon": {"sample": 1 / a, "output": -b / a}, "sample": {"sample": 0.0, "output": 1.0},
              "v_prediction": {"sample": a, "output": -b}}[kind]
        c_skip, c_out = (float(v) for v in scheduler.get_scalings_for_boundary_condition_discrete(t))
        nxt = None
        if i + 1 < len(steps):
            an = acp[steps[i + 1]]
            nxt = {"alpha": float(an.sqrt()), "sigma": float((1 - an).sqrt()), "timestep": steps[i + 1]}
        prog.append({"op": "lcm_step", "index": i, "timestep": t, "graph": graphs[(unet.name, "lcm")],
                     "component": unet.name, "output_name": unet.outputs[0].name, "latents": "image_latents",
                     "inputs": {"sample": "image_latents", "timestep": {"fill": float(t)},
                                "encoder_hidden_states": "image_text.prompt_embeds",
                                "text_embeds": "image_text.pooled_prompt_embeds",
                                "time_ids": {"value": [[oh, ow, 0, 0, oh, ow]]}},
                     "x0": x0, "c_skip": c_skip, "c_out": c_out, "next": nxt, "rng": RNG})
    prog.append({"op": "call", "graph": graphs[(dec.name, "image")], "component": dec.name,
                 "inputs": {"latents": "image_latents"}, "outputs": {dec.outputs[0].name: "image"}})
    prog.append({"op": "encode_first_frame", "input": "image", "factor": int(smp.sr_scale),
                 "interpolation": {"mode": "area"}, "graph": graphs[(enc.name, "first_frame")],
                 "component": enc.name, "input_name": enc.inputs[0].name, "output_name": enc.outputs[0].name,
                 "normalize": {"shift": m.image_shift, "scale": m.image_scale}, "output": "generated"})
    return prog


def constants(pipeline: Pipeline) -> dict[str, Any]:
    """Arrays the program reads (a folded schedule's timestep-embedding table), by file name."""
    from ndopt.model import interface_for

    m = interface_for(pipeline).sampler
    dits = pipeline.by_role("dit")
    if m is None or not m.is_sampler(pipeline.sampler) or not dits or not m.folded_time(dits[0]):
        return {}
    f = m.folded_schedule(pipeline)
    return {TIMESTEP_TABLE: {"array": f.table.detach().float().cpu().numpy(), "timesteps": list(f.timesteps)}}


def write_assets(pipeline: Pipeline, directory: Path) -> dict[str, Any]:
    """The text encoder's tokenizers as `tokenizers` library JSON under `directory` (the bundle being
    written); returns the manifest's `assets` record ({file: {"sha256", "kind"}})."""
    te = pipeline.by_role("text_encoder")
    toks = getattr(te[0].module, "tokenizers", None) if te else None
    if toks is None:
        return {}
    found = [(tokenizer_file(attr), getattr(toks, attr)) for attr, *_ in text_inputs(te[0].module)]
    image = pipeline.components.get("image_text_encoder")  # the hybrid pipeline's image model
    if image is not None and getattr(image.module, "tokenizers", None) is not None:
        found += [(tokenizer_file(f"image_{attr}"), tok)
                  for attr, tok in zip(("tokenizer", "tokenizer_2"), image.module.tokenizers)]
    out: dict[str, Any] = {}
    for rel, tok in found:
        attr = rel.split("/")[0]
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None:
            raise LoweringError(f"text encoder {te[0].name!r}: its {attr} ({type(tok).__name__}) is not a fast "
                                "tokenizer, so it cannot be saved as tokenizer.json for the runtime; load it with "
                                "use_fast=True (PreTrainedTokenizerFast)")
        path = Path(directory) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        backend.save(str(path))
        out[rel] = {"kind": "tokenizer", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return out


def graph_calls(prog: list[dict[str, Any]]) -> dict[str, int]:
    """How many times the program runs each graph (what tests compare with the call plan)."""
    out: dict[str, int] = {}
    for op in prog:
        if op["op"] == "denoise_step":
            out[op["graph"]] = out.get(op["graph"], 0) + len(op["calls"])
        elif op["op"] == "call":
            out[op["graph"]] = out.get(op["graph"], 0) + int(op.get("count", 1))
        elif op["op"] in ("lcm_step", "encode_first_frame"):
            out[op["graph"]] = out.get(op["graph"], 0) + 1
        elif op["op"] == "per_frame":
            out[op["graph"]] = out.get(op["graph"], 0) + int(op["frames"])
    return out


def manifest(*, target: dict[str, Any], pipeline: Pipeline, graphs: dict[str, dict[str, Any]],
             prog: list[dict[str, Any]], memory: dict[str, Any], estimate: dict[str, Any],
             constants: dict[str, Any] | None = None) -> dict[str, Any]:
    sch = pipeline.schedule
    return {
        "format": FORMAT,
        "version": VERSION,
        "target": target,
        "pipeline": {"name": pipeline.name, "latent_frames": sch.latent_frames, "height": sch.height,
                     "width": sch.width, "guidance": sch.guidance.mode, "stages": len(sch.stages),
                     "steps": [st.steps for st in sch.stages], "video_steps": [st.video_steps for st in sch.stages],
                     "passes": [p.name for p in pipeline.provenance]},
        "graphs": graphs,
        "constants": constants or {},
        "assets": {},
        "host_ops": HOST_OPS,
        "program": prog,
        "memory_plan": memory,
        "estimate": estimate,
    }


@cache
def schema() -> dict[str, Any]:
    """The manifest's JSON Schema (package data)."""
    return json.loads((resources.files(__package__) / SCHEMA).read_text())


def validate_manifest(m: dict[str, Any], path: Path | None = None) -> None:
    """Raise LoweringError naming the JSON path of the first place `m` breaks the schema; `path`: the
    manifest.json it was read from (the runtime's check of a written bundle), None while lowering."""
    import jsonschema

    doc = json.loads(json.dumps(m, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    validator = jsonschema.Draft202012Validator(schema())
    err = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if err is not None:
        where = "manifest" if path is None else str(path)
        fix = ("the program generator (targets/bundle.py) and the schema disagree: fix the one that is wrong"
               if path is None else "lower the pipeline again rather than editing manifest.json")
        raise LoweringError(f"{where} at {err.json_path}: {err.message} (targets/{SCHEMA}, rule "
                            f"{'/'.join(map(str, err.absolute_schema_path))}); {fix}")


__all__ = ["FORMAT", "HOST_OPS", "TIMESTEP_TABLE", "VERSION", "constants", "graph_calls", "graph_index",
           "manifest", "program", "schema", "validate_manifest", "write_assets"]
