"""The bundle an on-device runtime follows: graphs plus `manifest.json`.

The manifest says which graph to call, when (frame, stage, step), with which constants (the
timestep, the step's sigmas, the guidance scale, the renoise alpha/beta at a stage boundary) and
on which buffers; what each graph takes and returns; and a memory plan. For Pyramid-Flow the
program is generated from the pipeline's Schedule with the frontend's own schedule math
(`ndopt.frontends.pyramid_flow.schedule`), so it is the sampler's loop written out: a test checks
that it calls every graph exactly as often as the call plan says. Other samplers get a call list
(graph and count) without the loop.
"""

from __future__ import annotations

from typing import Any

from ndopt.errors import LoweringError
from ndopt.ir.pipeline import Pipeline
from targets.lowering import GraphPlan, graph_name

FORMAT = "ndopt-bundle/1"
TIMESTEP_TABLE = "timestep_embedding.npy"  # a folded schedule's timestep-MLP rows, [rows, D] float32

# What each host-side op of the program means (the runtime implements these; graphs do the rest).
HOST_OPS = {
    "tokenize": "tokenize the prompt (+ suffix) and, with guidance, the negative prompt, into the text "
                "encoder's id/mask inputs (int32, padded to the graph's lengths)",
    "init_noise": "noise ~ N(0, I) of `shape` (full resolution); then `downsample` times: bilinear to half "
                  "size, times 2 (keeps unit variance), down to stage 0's resolution",
    "frame_start": "latents = noise[:, :, first:first+frames] for this autoregressive unit",
    "history": "clips of generated frames (first, frames, stage): each frame bilinearly downsampled to "
               "the stage's resolution; fed before the current latents as sample_0..",
    "stage_start": "at stage > 0: latents = upsample_nearest(latents, size); then "
                   "latents = alpha * latents + beta * block_noise(gamma) (2x2-block correlated noise)",
    "denoise_step": "v = graph(...) per call; cfg: v = v_uncond + scale * (v_cond - v_uncond); cfg_batched: "
                    "one call on [uncond; cond] (inputs `a+b` are concatenated on the batch), v_uncond, v_cond = "
                    "v.chunk(2), then the same combination; latents += (sigma_next - sigma) * v. `fill`: a tensor "
                    "of the input's shape filled with the value; `table`/`row`: that row of the table file, "
                    "repeated over the batch",
    "frame_end": "append latents to the generated frames",
    "denormalize": "first latent frame: z / image_scale + image_shift; later frames: z / video_scale + "
                   "video_shift",
    "call": "run the graph `count` times per video",
}


def graph_index(plans: list[GraphPlan]) -> dict[tuple[str, str], str]:
    """(component, call-plan key) -> graph name (deduplicated signatures share a graph)."""
    return {(p.component, k): p.name for p in plans for k in p.keys}


def program(pipeline: Pipeline, plans: list[GraphPlan]) -> list[dict[str, Any]]:
    """The runtime's call list for a pipeline."""
    from ndopt.frontends.pyramid_flow.sampler import PyramidFlowSampler

    if isinstance(pipeline.sampler, PyramidFlowSampler):
        try:
            return pyramid_flow_program(pipeline, graph_index(plans))
        except KeyError as e:
            raise LoweringError(f"the program needs a graph for {e.args[0]} (component, call signature) that was "
                                f"not lowered; lowered: {sorted(p.name for p in plans)}; the sampler's call plan "
                                "and its loop disagree") from None
    return [{"op": "call", "graph": p.name, "component": p.component, "count": p.calls_per_video} for p in plans]


def pyramid_flow_program(pipeline: Pipeline, graphs: dict[tuple[str, str], str]) -> list[dict[str, Any]]:
    """The sampler's loop (`PyramidFlowSampler.sample` then `.decode`) written out with its constants.

    The denoising steps come from the frontend's own `sampler.unroll` (timestep or folded-table row,
    sigmas, guidance, renoise), so the manifest and the sampler cannot drift apart."""
    from ndopt.frontends.pyramid_flow import vae as vae_mod
    from ndopt.frontends.pyramid_flow.sampler import folded_time, history_clips, stage_hw, unroll

    sch, smp = pipeline.schedule, pipeline.sampler
    guided = sch.guidance.mode != "none"
    prog: list[dict[str, Any]] = []
    text = pipeline.by_role("text_encoder")
    prompts = ["uncond", "cond"] if guided else ["cond"]
    if text:
        te = text[0]
        prog.append({"op": "tokenize", "prompts": prompts, "suffix": smp.prompt_suffix,
                     "negative_prompt": smp.negative_prompt if guided else None})
        for which in prompts:
            prog.append({"op": "call", "graph": graphs[(te.name, "prompt")], "component": te.name,
                         "inputs": {p.name: f"tokens.{which}.{p.name}" for p in te.inputs},
                         "outputs": {p.name: f"text.{which}.{p.name}" for p in te.outputs}})
    dit = pipeline.by_role("dit")[0]
    folded = folded_time(dit)
    n_stages = len(sch.stages)
    h, w = stage_hw(sch, n_stages - 1)
    prog.append({"op": "init_noise", "shape": [1, int(dit.module.config.in_channels), sch.latent_frames, h, w],
                 "downsample": n_stages - 1, "output": "noise"})
    fpu = sch.temporal.frame_per_unit
    if sch.first_frame != "generate":
        prog.append({"op": "external_first_frame", "output": "generated[0]",
                     "note": "hybrid mode: the first latent frame comes from an image model outside this bundle"})
    calls = unroll(pipeline)
    batched = sch.guidance.mode == "cfg_batched"
    branches = ["uncond", "cond"] if sch.guidance.mode == "cfg" else ["uncond+cond" if batched else "cond"]
    for n, c in enumerate(calls):
        unit, s = c["unit"], c["stage"]
        if n == 0 or calls[n - 1]["unit"] != unit:
            if n:
                prog.append({"op": "frame_end", "unit": calls[n - 1]["unit"], "input": "latents",
                             "output": f"generated[{calls[n - 1]['unit']}]"})
            prog.append({"op": "frame_start", "unit": unit, "first": 0 if unit == 0 else 1 + (unit - 1) * fpu,
                         "frames": 1 if unit == 0 else fpu, "input": "noise", "output": "latents"})
        clips = history_clips(unit, s, n_stages, fpu)
        if c["step"] == 0:
            entry: dict[str, Any] = {"op": "stage_start", "unit": unit, "stage": s, "size": list(stage_hw(sch, s)),
                                     "history": [list(x) for x in clips]}
            if c["renoise"]:
                entry["renoise"] = {"alpha": c["renoise"][0], "beta": c["renoise"][1], "gamma": sch.gamma}
            prog.append(entry)
        samples = [f"history[{i}]" for i in range(len(clips))] + ["latents"]
        time_input = ({"timestep_embedding": {"table": TIMESTEP_TABLE, "row": c["timestep_row"]}} if folded
                      else {"timestep_ratio": {"fill": c["timestep"]}})
        graph_calls = []
        for which in branches:
            srcs = ["uncond", "cond"] if batched else [which]

            def text_buf(field: str, srcs: list[str] = srcs) -> str:
                return "+".join(f"text.{x}.{field}" for x in srcs)

            graph_calls.append({"prompt": which, "inputs": {
                **{f"sample_{k}": (f"{v}+{v}" if batched else v) for k, v in enumerate(samples)},
                "encoder_hidden_states": text_buf("prompt_embeds"),
                "encoder_attention_mask": text_buf("prompt_attention_mask"),
                "pooled_projections": text_buf("pooled_projections"), **time_input}})
        prog.append({"op": "denoise_step", "index": n, "unit": unit, "stage": s, "step": c["step"],
                     "graph": graphs[(dit.name, c["dit_signature"])], "component": dit.name,
                     "timestep": c["timestep"], "sigma": c["sigma"], "sigma_next": c["sigma_next"],
                     "guidance": {"mode": c["guidance"], "scale": c["guidance_scale"]}, "calls": graph_calls})
    if calls:
        prog.append({"op": "frame_end", "unit": calls[-1]["unit"], "input": "latents",
                     "output": f"generated[{calls[-1]['unit']}]"})
    dec = pipeline.by_role("vae_decoder")
    if dec:
        prog.append({"op": "denormalize", "input": "generated", "output": "z",
                     "image_scale": vae_mod.IMAGE_SCALE, "image_shift": vae_mod.IMAGE_SHIFT,
                     "video_scale": vae_mod.VIDEO_SCALE, "video_shift": vae_mod.VIDEO_SHIFT})
        prog.append({"op": "call", "graph": graphs[(dec[0].name, "video")], "component": dec[0].name,
                     "inputs": {"z": "z"}, "outputs": {p.name: p.name for p in dec[0].outputs}})
    return prog


def constants(pipeline: Pipeline) -> dict[str, Any]:
    """Arrays the program reads (a folded schedule's timestep-embedding table), by file name."""
    from ndopt.frontends.pyramid_flow.sampler import PyramidFlowSampler, folded_schedule, folded_time

    dits = pipeline.by_role("dit")
    if not isinstance(pipeline.sampler, PyramidFlowSampler) or not dits or not folded_time(dits[0]):
        return {}
    f = folded_schedule(pipeline)
    return {TIMESTEP_TABLE: {"array": f.table.detach().float().cpu().numpy(), "timesteps": list(f.timesteps)}}


def graph_calls(prog: list[dict[str, Any]]) -> dict[str, int]:
    """How many times the program runs each graph (what tests compare with the call plan)."""
    out: dict[str, int] = {}
    for op in prog:
        if op["op"] == "denoise_step":
            out[op["graph"]] = out.get(op["graph"], 0) + len(op["calls"])
        elif op["op"] == "call":
            out[op["graph"]] = out.get(op["graph"], 0) + int(op.get("count", 1))
    return out


def manifest(*, target: dict[str, Any], pipeline: Pipeline, graphs: dict[str, dict[str, Any]],
             prog: list[dict[str, Any]], memory: dict[str, Any], estimate: dict[str, Any],
             constants: dict[str, Any] | None = None) -> dict[str, Any]:
    sch = pipeline.schedule
    return {
        "format": FORMAT,
        "target": target,
        "pipeline": {"name": pipeline.name, "latent_frames": sch.latent_frames, "height": sch.height,
                     "width": sch.width, "guidance": sch.guidance.mode, "stages": len(sch.stages),
                     "steps": [st.steps for st in sch.stages], "video_steps": [st.video_steps for st in sch.stages],
                     "passes": [p.name for p in pipeline.provenance]},
        "graphs": graphs,
        "constants": constants or {},
        "host_ops": HOST_OPS,
        "program": prog,
        "memory_plan": memory,
        "estimate": estimate,
    }


__all__ = ["FORMAT", "HOST_OPS", "TIMESTEP_TABLE", "constants", "graph_calls", "graph_index", "graph_name",
           "manifest", "program"]
