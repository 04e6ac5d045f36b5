"""aimet_quantization's state in a saved pipeline (ndopt.saved: `RUN/model/quantization/<component>/`).

A sim is not pickled. Per quantized component the saved pipeline holds its quantizer state
(`quantizers.safetensors`: every encoding, taken before the weights were folded) and one example
call's inputs (`example_inputs.safetensors` + `.json`); the float weights are in the pipeline's own
weights file. `restore_sims` rebuilds each sim as the pass's `run` builds it (`_build`) over the
float component the replay loaded, loads the encodings (refusing a file that lacks one) and folds
the weight quantizers. The pass's `save_state` / `restore` delegate here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ndopt.errors import CheckpointError, PassError
from ndopt.ir.component import Component
from ndopt.ir.pipeline import Pipeline
from ndopt.passmanager import PassContext
from passes._aimet import support as aq
from passes._aimet.sim import QuantizedComponent, flat_tensors

if TYPE_CHECKING:
    from passes.aimet_quantization import AimetQuantization

QUANTIZERS = "quantizers.safetensors"
EXAMPLE = "example_inputs"


def save_quantizer_state(p: AimetQuantization, pipeline: Pipeline, directory: Path) -> dict[str, dict[str, str]]:
    """Per quantized component: its quantizer state and one example call's inputs, under
    `directory/<component>/`. Returns the attrs that point at these files (`quantizers`, relative to
    `directory`), which ndopt.saved stores relative to the saved pipeline."""
    from safetensors.torch import save_file

    paths: dict[str, dict[str, str]] = {}
    for c in p._selected(pipeline):
        qc = c.module
        if not isinstance(qc, QuantizedComponent):
            continue
        d = directory / c.name
        d.mkdir(parents=True, exist_ok=True)
        save_file(dict(qc.quantizer_state), str(d / QUANTIZERS))
        save_example_inputs(example_inputs(pipeline, c), d)
        paths[c.name] = {"quantizers": f"{c.name}/{QUANTIZERS}"}
    return paths


def restore_sims(p: AimetQuantization, pipeline: Pipeline, ctx: PassContext, state: Path) -> Pipeline:
    """The sims `save_quantizer_state` described, over the float components the replay loaded: built as
    `run` builds them, the saved encodings loaded (all of them: a missing one is refused), the weight
    quantizers folded."""
    from safetensors.torch import load_file

    new: dict[str, Component] = {}
    with aq.quiet_aimet():
        for c in p._selected(pipeline):
            if isinstance(c.module, QuantizedComponent) or c.attrs.get("precision") is None:
                continue
            d = state / c.name
            if not (d / QUANTIZERS).is_file():
                raise CheckpointError(f"{d}: no {QUANTIZERS} for the quantized component {c.name!r}; "
                                      "the saved pipeline is incomplete")
            example = load_example_inputs(d, c.device)
            config = str(c.attrs.get("aimet_config") or p.aimet_config(ctx)[0])
            b = p._build(c, [example], config)
            qstate = load_file(str(d / QUANTIZERS))
            check_complete(d / QUANTIZERS, flat_tensors(b.sim.quantizer_state_dict()), qstate)
            # strict=False: the file holds quantizer state only; the sim's float parameters and buffers
            # (which `load_state_dict` lists as missing) are the replayed float module's, copied by _build
            _, unexpected = b.sim.model.load_state_dict(nested_quantizer_state(qstate), strict=False)
            if unexpected:
                raise CheckpointError(f"{d}: {len(unexpected)} saved encodings fit no quantizer of the rebuilt "
                                      f"sim ({unexpected[:4]}); the pass's config or version changed")
            b.sim.fold_param_quantizers()
            qc = QuantizedComponent(c.module, b.sim, c.entry, p.config.precision, config, qstate)
            qc.__dict__["example_inputs"] = example
            new[c.name] = c.with_module(qc, quantizers=str(d / QUANTIZERS))
    return pipeline.replace(**new)


def check_complete(path: Path, expected: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor]) -> None:
    """Every quantizer of the rebuilt sim has its encoding in the file: its `min`/`max` (or `scale`/
    `offset`) and every tensor of its `_extra_state`. `expected` is the rebuilt sim's quantizer state,
    flattened as it was saved, so it names quantizer keys only: the float weights, which the file
    legitimately lacks, are not in it, and neither are quantizers the config removed (overrides with
    `float: true` set them to None in the saved sim and in the rebuilt one alike). An uncalibrated
    sim's quantizers already hold these tensors, so a name missing from the file is a lost encoding,
    which would otherwise run with the rebuilt sim's uncalibrated range."""
    missing = sorted(set(expected) - set(saved))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} quantizer encodings of the rebuilt sim are missing from the "
                              f"file ({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}); the file was "
                              "truncated or edited: save the pipeline again from its run")


def nested_quantizer_state(flat: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """`flat_tensors`'s dotted `_extra_state` keys back into the dicts AIMET's quantizers load."""
    out: dict[str, Any] = {}
    for k, v in flat.items():
        head, sep, tail = k.partition("._extra_state.")
        if sep:
            out.setdefault(f"{head}._extra_state", {})[tail] = v
        else:
            out[k] = v
    return out


def example_inputs(pipeline: Pipeline, comp: Component) -> dict[str, Any]:
    """One call's inputs of a component: the first calibration call where the sim kept it, else
    tensors of its first call signature (a sim's structure depends on the call's shapes, not values)."""
    kept = comp.module.__dict__.get("example_inputs") if isinstance(comp.module, QuantizedComponent) else None
    if kept is not None:
        return kept
    for sig in pipeline.call_plan():
        if sig.component == comp.name:
            g = torch.Generator().manual_seed(0)
            return {name: (list(v) if isinstance(v, list) else v)
                    for name, v in sig.make_inputs(comp.device, g).items() if name not in sig.static_dict}
    raise PassError(f"aimet_quantization: the sampler never calls {comp.name!r}; no example call to save")


def save_example_inputs(inputs: Mapping[str, Any], d: Path) -> None:
    """Tensors (and lists of tensors, as `<name>.<i>`) in safetensors, their order and layout in JSON."""
    from safetensors.torch import save_file

    tensors, layout = {}, []
    for name, v in inputs.items():
        if isinstance(v, torch.Tensor):
            tensors[name] = v.detach().cpu().contiguous()
            layout.append([name, None])
        elif isinstance(v, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in v):
            tensors.update({f"{name}.{i}": t.detach().cpu().contiguous() for i, t in enumerate(v)})
            layout.append([name, len(v)])
        else:
            raise PassError(f"aimet_quantization: example input {name!r} is a {type(v).__name__}, not tensors")
    save_file(tensors, str(d / f"{EXAMPLE}.safetensors"))
    (d / f"{EXAMPLE}.json").write_text(json.dumps({"layout": layout}) + "\n")


def load_example_inputs(d: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors = load_file(str(d / f"{EXAMPLE}.safetensors"), device=str(device))
    layout = json.loads((d / f"{EXAMPLE}.json").read_text())["layout"]
    return {name: tensors[name] if n is None else [tensors[f"{name}.{i}"] for i in range(n)] for name, n in layout}
