"""Every Neodragon pass on the tiny miniFLUX pipeline, through the model interface (issue 23).

The passes never name a miniFLUX class: they ask `interface_for(pipeline)`, which is the
`pyramid-flow-miniflux` frontend here. One module-scoped tiny pipeline (64x64, 2 latent frames,
2-2-2 / 1-1-1 steps, seeded random DiT over the bundled tiny VAE), each pass through the PassManager
(verified like in a run), with training passes at a few steps: structure and fired checks, the exact
passes against the unoptimized pipeline (1e-5), the lossy ones reporting their figures.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ndopt.errors import PassError
from ndopt.frontends.miniflux.blocks import DOUBLE, SINGLE
from ndopt.frontends.miniflux.dt5 import MiniFluxDistilledTextEncoder
from ndopt.frontends.miniflux.sampler import IMAGE_SCALE, IMAGE_SHIFT
from ndopt.frontends.pyramid_flow.tiny_decoder import TinyVideoDecoder
from ndopt.model import hybrid_pipeline, interface_for, load_model
from ndopt.passmanager import PassContext, PassManager
from passes.aimet_quantization import AimetQuantization
from passes.block_importance import BlockImportance
from passes.block_pruning import BlockPruning
from passes.cfg_folding import CfgFolding
from passes.dead_component_elimination import DeadComponentElimination
from passes.decoder_swap import DecoderSwap
from passes.encoder_substitution import EncoderSubstitution
from passes.schedule_folding import ScheduleFolding
from passes.step_distillation import StepDistillation

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROMPT = "a red circle moving left on a blue background"
IMPORTANCE = {"prompts": [PROMPT], "steps": [1, 1, 1]}
EXACT_TOL = 1e-5  # cfg_folding's and schedule_folding's Exact(tolerance)
W8A16_LATENT_PSNR_DB = 25.0  # budget: W8A16 of the random tiny DiT (measured ~38 dB with every component)


@pytest.fixture(scope="module")
def mf():
    p = load_model("pyramid-flow-miniflux-tiny")
    return p.replace(schedule=p.schedule.with_steps((2, 2, 2), (1, 1, 1)))


def _run(passes, pipeline, run_dir):
    final, records = PassManager(passes).run(pipeline, PassContext(run_dir=run_dir))
    return final, [r.record["metrics"] for r in records]


def _latents(p, seed=0):
    with torch.no_grad():
        return p.sampler.sample(p, [PROMPT], generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _identity_blocks(pipeline, double: int, single: int):
    """A copy whose double block `double` and single block `single` return their inputs exactly (gates 0)."""
    comp = pipeline["dit"]
    dit = copy.deepcopy(comp.module)
    with torch.no_grad():
        b, d = dit.transformer_blocks[double], dit.config.inner_dim
        for lin in (b.norm1.linear, b.norm1_context.linear):
            for chunk in (2, 5):  # adaLN-zero's gate_msa and gate_mlp
                lin.weight[chunk * d:(chunk + 1) * d] = 0
                lin.bias[chunk * d:(chunk + 1) * d] = 0
        lin = dit.single_transformer_blocks[single].norm.linear
        lin.weight[2 * d:] = 0  # (shift, scale, gate): the gate
        lin.bias[2 * d:] = 0
    return pipeline.replace(dit=comp.with_module(dit))


# ---- the frontend -----------------------------------------------------------------------------------
def test_the_pipeline_is_the_miniflux_frontends(mf):
    model = interface_for(mf)
    assert model.name == mf.frontend == "pyramid-flow-miniflux"
    blocks = model.blocks(mf["dit"].module)
    assert [(b.index, b.kind, b.name) for b in blocks] == [
        (0, DOUBLE, "transformer_blocks.0"), (1, DOUBLE, "transformer_blocks.1"),
        (2, SINGLE, "single_transformer_blocks.0"), (3, SINGLE, "single_transformer_blocks.1")]
    assert (model.sampler.image_scale, model.sampler.image_shift) == (IMAGE_SCALE, IMAGE_SHIFT)
    for cap in ("hybrid", "untrained", "save_weights", "build_from_configs"):  # SD3-only
        assert not model.supports(cap)
    with pytest.raises(PassError, match="'hybrid'"):
        hybrid_pipeline(mf)


# ---- block importance and pruning, both kinds ------------------------------------------------------------
@pytest.fixture(scope="module")
def scored(mf, tmp_path_factory):
    planted = _identity_blocks(mf, double=1, single=1)
    final, (m,) = _run([BlockImportance(IMPORTANCE)], planted, tmp_path_factory.mktemp("bi"))
    return planted, final, m


def test_block_importance_scores_both_kinds(scored):
    _, _, m = scored
    assert len(m["scores"]) == 4 and m["dit_calls"] > 0
    assert m["scores"][1] == m["scores"][3] == 0.0  # the exact identities (block 3 = single block 1)
    assert min(m["scores"][0], m["scores"][2]) > 1e-4
    assert sorted(m["order"][:2]) == [1, 3]


def test_block_pruning_removes_the_identities_of_both_kinds_exactly(scored, tmp_path):
    planted, final, _ = scored
    pruned, (m,) = _run([BlockPruning({"keep": 12, "evaluate": False})], final, tmp_path)  # 12 of 24: 2 of 4
    assert m["removed_blocks"] == [1, 3] and m["kept_blocks"] == [0, 2] and m["blocks"] == [4, 2]
    new, old = pruned["dit"].module, planted["dit"].module
    assert (new.config.num_layers, new.config.num_single_layers) == (1, 1)
    assert "blocks=1+1" in pruned.summary()
    assert torch.equal(new.transformer_blocks[0].attn.to_q.weight, old.transformer_blocks[0].attn.to_q.weight)
    assert torch.equal(new.single_transformer_blocks[0].proj_out.weight, old.single_transformer_blocks[0].proj_out.weight)
    assert m["dit_params"] == sum(p.numel() for p in new.parameters()) == planted["dit"].params() - m["params_removed"]
    graph = (tmp_path / "passes" / "01_block_pruning" / "block_graph.py").read_text()
    assert "transformer_blocks_1" not in graph and "single_transformer_blocks_1" not in graph
    assert _rel(_latents(pruned), _latents(planted)) < EXACT_TOL  # identities gone: the same latents


def test_block_pruning_kinds_restricts_what_may_go(scored, tmp_path):
    _, final, _ = scored
    pruned, (m,) = _run([BlockPruning({"keep": 12, "kinds": [SINGLE], "evaluate": False})], final, tmp_path)
    assert m["removed_blocks"] == [3] and m["blocks"] == [4, 3]  # 1 of the 2 single blocks
    assert len(pruned["dit"].module.transformer_blocks) == 2
    with pytest.raises(PassError, match="no 'joint' blocks"):
        _run([BlockPruning({"keep": 12, "kinds": ["joint"], "evaluate": False})], final, tmp_path / "joint")


def test_block_pruning_fine_tunes_with_the_frontends_block_names(scored, tmp_path):
    """Stage 1 matches the kept blocks' features by the names the frontend gives (`transformer_blocks.i`,
    `single_transformer_blocks.j`); stage 2 trains on latents normalised with miniFLUX's constants."""
    _, final, _ = scored
    spec = {"steps": 2, "batch_size": 2, "checkpoint_every": 100}
    cfg = {"keep": 18, "evaluate": False, "stage1": spec, "stage2": spec,
           "data": {"clips": 4, "frames": 1, "height": 64, "width": 64}}
    pruned, (m,) = _run([BlockPruning(cfg)], final, tmp_path)
    assert m["blocks"] == [4, 3]
    tuned = pruned["dit"].module
    kept = final["dit"].module
    assert not torch.equal(tuned.transformer_blocks[0].attn.to_q.weight, kept.transformer_blocks[0].attn.to_q.weight)
    cached = [p.name for p in tmp_path.rglob("latents-*.safetensors")]  # NDOPT_CACHE=0: in the pass dir
    assert cached and all("pyramid-flow-miniflux" in n for n in cached)  # never SD3-normalised latents


# ---- encoder substitution (T5 -> DT5 + adapter, CLIP-L kept) ------------------------------------------
@pytest.fixture(scope="module")
def substituted(mf, tmp_path_factory):
    cfg = {"dt5_steps": 2, "adapter_steps": 2, "batch_size": 2, "eval_prompts": 2, "probe_steps": [1, 1, 1]}
    return _run([EncoderSubstitution(cfg)], mf, tmp_path_factory.mktemp("es"))


def test_encoder_substitution_reports_fidelity(mf, substituted):
    out, (m,) = substituted
    te, dit = out["text_encoder"].module, out["dit"].module
    assert isinstance(te, MiniFluxDistilledTextEncoder) and te.config.variant == "replace"
    assert te.text_encoder is mf["text_encoder"].module.text_encoder  # CLIP-L stays, shared
    assert isinstance(dit.context_embedder, torch.nn.Identity) and mf["dit"].module.context_embedder is not None
    width = dit.config.inner_dim
    assert out["text_encoder"].outputs[0].spec.shape == ("B", "L", width)
    assert out["dit"].inputs[1].spec.shape == ("B", "L", width)
    assert m["text_encoding_params"] == te.text_encoding_params() and m["dt5_steps"] == m["adapter_steps"] == 2
    assert -1 <= m["context_cosine"] <= 1 and isinstance(m["latent_psnr"], float)
    assert _latents(out).shape == (1, 16, 2, 8, 8)
    with pytest.raises(PassError, match="already DT5"):
        EncoderSubstitution({"dt5_steps": 0, "adapter_steps": 0, "probe": False}).run(out, PassContext("unused"))


def test_block_pruning_after_encoder_substitution_and_the_saved_model(substituted, tmp_path):
    """Neodragon's order: the pruned DiT keeps the adapter's identity context embedder; the result saves
    and reloads (RUN/model: the frontend's preset replayed, the weights loaded) to the same latents."""
    from ndopt.saved import load_saved, save_pipeline

    out, _ = substituted
    pruned, (m,) = _run([BlockPruning({"remove": [0, 2], "evaluate": False})], out, tmp_path)
    dit = pruned["dit"].module
    assert isinstance(dit.context_embedder, torch.nn.Identity) and m["blocks"] == [4, 2]
    back = load_saved(save_pipeline(pruned, tmp_path / "model"))
    assert back.frontend == "pyramid-flow-miniflux" and back.summary() == pruned.summary()
    latents = _latents(pruned)
    assert torch.isfinite(latents).all() and torch.equal(_latents(back), latents)


# ---- decoder swap --------------------------------------------------------------------------------------
def test_decoder_swap_to_the_tiny_decoder(mf, tmp_path):
    out, (m,) = _run([DecoderSwap({"decoder": "tiny", "steps": 2, "batch_size": 1, "eval_videos": 1})], mf, tmp_path)
    assert isinstance(out["vae_decoder"].module, TinyVideoDecoder) and m["steps"] == 2
    assert 0 < m["params_after"] < m["params_before"] == mf["vae_decoder"].params()
    assert all(isinstance(m[k], float) for k in ("decoded_psnr", "decoded_psnr_untrained", "psnr_vs_native"))
    assert out.sampler.decode(out, _latents(mf)).shape == (1, 3, 9, 64, 64)


# ---- step distillation, then the exact passes ------------------------------------------------------------
@pytest.fixture(scope="module")
def distilled(mf, tmp_path_factory):
    d = tmp_path_factory.mktemp("dmd")
    cfg = {"train": {"steps": 3, "batch_size": 3, "checkpoint_every": 0}, "data": {"clips": 3},
           "evaluate_latent_frames": 1}
    final, (m,) = _run([StepDistillation(cfg)], mf, d)
    return final, m, d


def test_step_distillation_and_its_student_file(mf, distilled, tmp_path):
    final, m, d = distilled
    assert [s.steps for s in final.schedule.stages] == [1, 1, 1] and "guidance_free" in final.facts
    assert m["train_steps"] == 3 and m["dit_calls_per_video"] == "18 -> 12"
    assert set(m["latent_psnr_vs_teacher"]) == {"student", "undistilled"}
    student = next(d.rglob("student.safetensors"))  # written through the interface, read back through it
    again, (m2,) = _run([StepDistillation({"student_weights": str(student), "evaluate": False})], mf, tmp_path)
    a, b = final["dit"].module.state_dict(), again["dit"].module.state_dict()
    assert m2["student_weights"] == str(student) and all(torch.equal(a[k], b[k]) for k in a)


def test_exact_passes_match_the_unoptimized_pipeline(mf, distilled, tmp_path):
    out, ms = _run([DeadComponentElimination(), CfgFolding(), ScheduleFolding()], mf, tmp_path)
    assert ms[0]["removed"] == ["vae_encoder"] and ms[1]["guidance"] == "cfg -> cfg_batched"
    assert ms[2]["table_rows"] == 6 and out.schedule.folded
    a, b = _latents(out), _latents(mf)
    assert _rel(a, b) < EXACT_TOL
    assert _rel(out.sampler.decode(out, a), mf.sampler.decode(mf, b)) < 1e-4
    # a guidance-free student drops the unconditional branch: the same numbers, half the calls
    student = distilled[0]
    dropped, (m,) = _run([CfgFolding()], student, tmp_path / "drop")
    assert m["guidance"] == "cfg -> none" and _rel(_latents(dropped), _latents(student)) < EXACT_TOL


# ---- quantization ----------------------------------------------------------------------------------------
def test_aimet_quantization_w8a16_reports_fidelity(mf, tmp_path):
    folded, _ = _run([DeadComponentElimination(), CfgFolding(), ScheduleFolding()], mf, tmp_path / "exact")
    cfg = {"precision": "w8a16", "components": ["dit"], "export": "none", "eval_prompts": [PROMPT],
           "calibration": {"prompts": [PROMPT], "latent_frames": 1}}
    out, (m,) = _run([AimetQuantization(cfg)], folded, tmp_path)
    assert m["precision"] == "w8a16" and set(m["components"]) == {"dit"}
    assert m["components"]["dit"]["quantized_ops"]["Linear"] > 0
    assert m["fidelity"]["latent_psnr"] >= W8A16_LATENT_PSNR_DB, m["fidelity"]
    assert out["dit"].attrs["precision"] == "w8a16" and "precision" not in out["text_encoder"].attrs
