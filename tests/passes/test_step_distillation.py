"""step_distillation: structure (schedule, golden summary), fired, the DMD objective's alternation,
fidelity figures, resume after interruption, refusal of a second distillation, errors; plan on 768p.

One short DMD run on the tiny preset (a few steps: figures are reported, not judged) is shared by
the module; the test that judges the figures needs the trained tiny teacher and skips without it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from golden import check_golden
from pydantic import ValidationError

from ndopt.errors import PassError
from ndopt.frontends.pyramid_flow.presets import preset_specs
from ndopt.frontends.pyramid_flow.students import load_student, save_student
from ndopt.passmanager import PassContext, PassManager
from ndopt.train.data import Batch
from ndopt.train.engine import TrainConfig, Trainer
from ndopt.train.objectives import PromptEncoder, StepInfo
from ndopt.train.step_objectives import PyramidalDMD, is_student_step, student_levels
from passes.cfg_folding import CfgFolding
from passes.schedule_folding import ScheduleFolding
from passes.step_distillation import StepDistillation

CONFIG = {"train": {"steps": 6, "batch_size": 3, "lr": 1e-4, "checkpoint_every": 3},
          "data": {"clips": 12}, "evaluate_latent_frames": 1}


@pytest.fixture(scope="module")
def distilled(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("dmd")
    final, records = PassManager([StepDistillation(CONFIG)]).run(tiny, PassContext(run_dir=d))
    return final, records[0].record, d


def _weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# ---- structure and fired --------------------------------------------------------------------------
def test_schedule_after_the_pass(tiny, distilled):
    final, record, _ = distilled
    sch = final.schedule
    assert [s.steps for s in sch.stages] == [1, 1, 1] and [s.video_steps for s in sch.stages] == [1, 1, 1]
    assert (sch.guidance.scale, sch.guidance.video_scale) == (1.0, 1.0) and sch.guidance.mode == "cfg"
    assert "guidance_free" in final.facts
    m = record["metrics"]
    # tiny: 2 latent frames; 20-20-20 + 10-10-10 steps x 2 (CFG) -> 1-1-1 + 1-1-1, still 2 calls until cfg_folding
    assert m["dit_calls_per_video"] == "180 -> 12" and m["dit_calls_per_video_guidance_free"] == 6
    assert m["steps"] == "20-20-20/10-10-10 -> 1-1-1/1-1-1"
    folded = CfgFolding().run(final, PassContext(run_dir=distilled[2])).pipeline
    assert folded.schedule.guidance.mode == "none" and folded.schedule.dit_calls_per_video == 6
    # the input is untouched, the student is a new module
    assert tiny.schedule.guidance.scale == preset_specs()["pyramid-flow-tiny"].guidance_scale and [s.steps for s in tiny.schedule.stages] == [20, 20, 20]
    assert final["dit"].module is not tiny["dit"].module and not _same(_weights(final["dit"].module),
                                                                        _weights(tiny["dit"].module))


def test_structure_golden(distilled):
    check_golden("tiny_after_step_distillation.txt", distilled[0].summary())


def test_reports_fidelity_calls_and_loss_plot(distilled):
    _, record, _ = distilled
    m = record["metrics"]
    fid = m["latent_psnr_vs_teacher"]
    assert set(fid) == {"student", "undistilled"} and all(math.isfinite(v) for v in fid.values())
    assert len(m["loss_student_curve"]) == 2 and len(m["loss_fake_curve"]) == 4  # 1 student per 2 fake steps
    assert m["train_steps"] == 6 and m["resumed_from"] is None
    for key in ("loss_plot", "train_metrics"):
        assert record["artifacts"][key].endswith((".png", ".json"))
        assert __import__("pathlib").Path(record["artifacts"][key]).is_file()


def test_other_step_counts(tiny, tmp_path):
    for steps in ([2, 2, 2], [4, 4, 4]):
        out = StepDistillation({"steps": steps}).plan(tiny, PassContext(run_dir=tmp_path, plan=True)).pipeline
        assert [s.steps for s in out.schedule.stages] == steps == [s.video_steps for s in out.schedule.stages]
    out = StepDistillation({"steps": [2, 2, 2], "video_steps": [1, 1, 1]}).plan(tiny, PassContext(tmp_path)).pipeline
    assert out.schedule.steps_per_video == 6 + 3 and out.schedule.dit_calls_per_video == 18
    # the student's fixed local levels are the sampler's: four for 4-4-4 (seed), r = 1 for 1-1-1
    assert student_levels(1) == [1.0] and len(student_levels(4)) == 4
    assert student_levels(4)[0] == 1.0 and abs(student_levels(4)[-1] - 1e-3) < 1e-12


# ---- the objective: alternation -----------------------------------------------------------------
def _batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(["a red circle moving left", "a blue square moving up", "a green ring"], None,
                 torch.randn(3, 16, 2, 8, 8, generator=g), torch.arange(3), torch.tensor([11, 12, 13]))


class _Data:
    def __init__(self) -> None:
        self.b = _batch()

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i):
        from ndopt.train.data import Example

        return Example(self.b.captions[i], latents=self.b.latents[i])


def _objective(tiny) -> PyramidalDMD:
    return PyramidalDMD(tiny.schedule, (1, 1, 1), (1, 1, 1))


def test_alternation_one_student_update_per_two_fake_updates(tiny, tmp_path):
    assert [is_student_step(s) for s in range(6)] == [False, False, True, False, False, True]
    teacher = tiny["dit"].module
    student, fake = __import__("copy").deepcopy(teacher), __import__("copy").deepcopy(teacher)
    te = PromptEncoder(tiny["text_encoder"].module, 16)
    t0 = _weights(teacher)

    def fit(steps: int):
        Trainer(trainable={"student": student, "fake": fake}, frozen={"teacher": teacher, "text_encoder": te},
                objective=_objective(tiny), data=_Data(), run_dir=tmp_path,
                config=TrainConfig(steps=steps, batch_size=3, lr=1e-3, log_every=1), show_progress=False).fit()

    fit(2)  # steps 0 and 1: the fake model only
    assert _same(_weights(student), t0) and not _same(_weights(fake), t0)
    f2 = _weights(fake)
    fit(3)  # resumes; step 2: the student only
    assert not _same(_weights(student), t0) and _same(_weights(fake), f2)
    assert _same(_weights(teacher), t0)


class _Modules(dict):
    """The objective's TrainModules: student and fake as trainable copies of the teacher."""

    def __init__(self, tiny) -> None:
        import copy

        super().__init__(student=copy.deepcopy(tiny["dit"].module).requires_grad_(True),
                         fake=copy.deepcopy(tiny["dit"].module).requires_grad_(True), teacher=tiny["dit"].module,
                         text_encoder=PromptEncoder(tiny["text_encoder"].module, 16))

    def raw(self, n):
        return self[n]


def test_student_step_gradients_reach_only_the_student(tiny):
    mods = _Modules(tiny)
    for step, learner in ((0, "fake"), (2, "student")):
        out = _objective(tiny)(mods, _batch(), StepInfo(step))
        out.loss.backward()
        grads = {n: any(p.grad is not None for p in mods[n].parameters()) for n in ("student", "fake")}
        assert grads == {"student": learner == "student", "fake": learner == "fake"}
        assert math.isfinite(out.metrics["loss"])
        assert any(k.startswith("loss_dmd") for k in out.metrics) == (learner == "student")
        for n in ("student", "fake"):
            mods[n].zero_grad(set_to_none=True)


# ---- the objective: regression on the teacher's ODE ----------------------------------------------
def test_ode_target_algebra_with_a_constant_velocity(tiny):
    """Under a constant guided velocity v0 every Euler path gives v* = v0, so z*_theta = z - sigma/D v0."""
    from ndopt.train.step_objectives import global_sigma

    stage = tiny.schedule.stages[1]
    z = torch.randn(3, 16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    v0 = torch.randn_like(z)
    calls = []

    def call(name, sample, t, c):
        calls.append((name, t.clone()))
        return v0 + 0 * sample

    r, r_next = torch.tensor([1.0, 0.667, 0.001]), torch.tensor([0.667, 0.334, 0.0])
    cond = uncond = (torch.zeros(3, 2, 8),) * 3
    got = _objective(tiny).ode_target(call, z, r, r_next, stage, cond, uncond, 0, teacher_steps=20)
    sigma = global_sigma(stage, r).view(-1, 1, 1, 1, 1)
    assert torch.allclose(got, z - sigma / (stage.sigma_start - stage.sigma_end) * v0, atol=1e-5)
    # the teacher runs with CFG (conditional and unconditional calls) on its own 20-step grid:
    # 7 grid points inside (0.667, 1] after 1.0 -> 7 substeps for the longest path
    assert {n for n, _ in calls} == {"teacher"} and len(calls) == 2 * 7


def test_ode_target_of_a_one_step_stage_is_the_teachers_stage_solve(tiny):
    """k = 1 at r = 1: the student's one Euler move must land where the sampler's own 20-step guided
    solve of the stage does (the sampler's timesteps and sigmas, written out independently here)."""
    from ndopt.frontends.pyramid_flow.schedule import stage_local_sigmas, stage_timesteps
    from ndopt.train.step_objectives import global_sigma

    sch, dit, smp = tiny.schedule, tiny["dit"].module, tiny.sampler
    stage, scale, n = sch.stages[0], sch.guidance.scale, sch.stages[0].steps
    emb, mask, pooled, nemb, nmask, npooled = smp.encode_prompts(tiny, ["a red circle", "a blue ring"])
    cond, uncond = (emb, mask, pooled), (nemb, nmask, npooled)
    z = torch.randn(2, 16, 1, 2, 2, generator=torch.Generator().manual_seed(1))

    def dit_call(sample, t, c):
        with torch.no_grad():
            return dit(sample=[sample], encoder_hidden_states=c[0], encoder_attention_mask=c[1],
                       pooled_projections=c[2], timestep_ratio=t).float()

    ref, sig = z.clone(), stage_local_sigmas(n)
    for i, t in enumerate(stage_timesteps(stage, n)):
        tt = torch.full((2,), t)
        v_u, v_c = dit_call(ref, tt, uncond), dit_call(ref, tt, cond)
        ref = ref + (sig[i + 1] - sig[i]) * (v_u + scale * (v_c - v_u))

    r, r_next = torch.ones(2), torch.zeros(2)
    target = _objective(tiny).ode_target(lambda name, sample, t, c: dit_call(sample, t, c), z, r, r_next, stage,
                                         cond, uncond, 0, teacher_steps=n)
    v_star = (z - target) * (stage.sigma_start - stage.sigma_end) / global_sigma(stage, r).view(-1, 1, 1, 1, 1)
    landed = z - (r - r_next).view(-1, 1, 1, 1, 1) * v_star
    assert torch.allclose(landed, ref, rtol=1e-4, atol=1e-4), (landed - ref).abs().max()


def test_ode_weight_adds_a_regression_term(tiny):
    mods = _Modules(tiny)
    plain = _objective(tiny)(mods, _batch(), StepInfo(2))
    with_ode = replace(_objective(tiny), ode_weight=1.0)(mods, _batch(), StepInfo(2))
    odes = {k: v for k, v in with_ode.metrics.items() if k.startswith("loss_ode")}
    assert odes and all(v > 0 for v in odes.values()) and not any(k.startswith("loss_ode") for k in plain.metrics)
    assert with_ode.metrics["loss"] > plain.metrics["loss"]


def test_evaluation_over_several_noise_draws(tiny, distilled):
    from passes.step_distillation import evaluate

    one = distilled[1]["metrics"]["latent_psnr_vs_teacher"]  # the pass's own one-draw figure
    two = evaluate(tiny, distilled[0], 1, None, seeds=2)
    assert set(one) == {"student", "undistilled"}
    for k in ("student", "undistilled"):  # draw 0 is the one-draw figure; the mean lies above the worst draw
        assert two[f"{k}_min"] <= two[k] and min(one[k], two[f"{k}_min"]) == two[f"{k}_min"]
        assert two[k] != one[k]  # a second draw changes the figure


# ---- the guidance warm start and the teacher's samples ---------------------------------------------
def test_guidance_distillation_regresses_the_guided_velocity(tiny):
    """The target is D_u + g (D_c - D_u) of the frozen teacher at the frame's scale: a student that is the
    teacher itself (one conditional call) misses it by exactly (g - 1) (D_c - D_u)."""
    from ndopt.train.objectives import dit_kwargs, pyramid_flow_inputs
    from ndopt.train.step_objectives import GuidanceDistillation

    mods, batch, info = _Modules(tiny), _batch(), StepInfo(0)
    obj = GuidanceDistillation(tiny.schedule, negative_prompt="blurry")
    out = obj(mods, batch, info)
    cond, uncond = mods["text_encoder"](batch.captions), mods["text_encoder"](["blurry"] * 3)
    g = tiny.schedule.guidance
    for inp in pyramid_flow_inputs(batch.latents, batch, tiny.schedule, info):
        scale = g.scale if inp.unit == 0 else g.video_scale
        with torch.no_grad():
            v_c = mods["teacher"](**dit_kwargs(inp, cond)).float()
            v_u = mods["teacher"](**dit_kwargs(inp, uncond)).float()
        want = ((scale - 1) * (v_c - v_u)).pow(2).flatten(1).mean(1).mean()
        assert out.metrics[f"loss_stage{inp.stage}"] == pytest.approx(float(want), rel=1e-4)
    out.loss.backward()
    assert any(p.grad is not None for p in mods["student"].parameters())
    assert all(p.grad is None for p in mods["teacher"].parameters())


def test_teacher_samples_are_the_pipelines_own_and_cached(tiny, tmp_path, monkeypatch):
    from ndopt.train.step_objectives import teacher_samples

    captions = ["a red circle", "a blue ring", "a green square"]
    short = tiny.replace(schedule=tiny.schedule.with_steps((2, 2, 2)))  # a short full schedule: fast
    got = teacher_samples(short, captions, (16, 1, 8, 8), 7, tmp_path, chunk=2)
    assert got.latents.shape == (3, 16, 1, 8, 8) and len(got) == 3 and got[1].caption == "a blue ring"
    assert got[1].noise_seed == int(got.noise_seeds[1]) and len(set(got.noise_seeds.tolist())) == 3
    pipe = short.replace(schedule=short.schedule.with_frames(1, 64, 64))
    with torch.no_grad():  # each sample from its own generator, in another batch than the bank's chunks
        want = pipe.sampler.sample(pipe, captions, generator=[torch.Generator().manual_seed(int(s))
                                                              for s in got.noise_seeds])
    # CFG, negative prompt and noise of the sampler; other batch shapes (chunks of 2 against 3, CFG batched)
    # change the GEMMs' summation order, which the sampler's 6 steps carry on at float32 rounding
    err = (got.latents - want.float()).abs().max().item()
    assert err < 1e-4 * want.abs().max().item(), err
    assert len(list(tmp_path.glob("teacher-samples-*.safetensors"))) == 1

    class Sampled(Exception):
        pass

    def refuse(*a, **k):
        raise Sampled

    monkeypatch.setattr(type(short.sampler), "sample", refuse)
    again = teacher_samples(short, captions, (16, 1, 8, 8), 7, tmp_path)
    assert torch.equal(again.latents, got.latents) and torch.equal(again.noise_seeds, got.noise_seeds)  # read
    with pytest.raises(Sampled):  # another seed (or caption, shape, schedule, weights) is another bank
        teacher_samples(short, captions, (16, 1, 8, 8), 8, tmp_path)


def _trajectory_bank(pipe, captions, seeds):
    """What teacher_samples holds for these captions and seeds, sampled by `pipe`."""
    from ndopt.train.step_objectives import SampledLatents

    seeds = torch.tensor(seeds, dtype=torch.int64)
    with torch.no_grad():
        z = pipe.sampler.sample(pipe, captions, generator=[torch.Generator().manual_seed(int(s)) for s in seeds])
    return SampledLatents(captions, z.float(), seeds)


def test_trajectory_distillation_replays_the_teachers_noise(tiny):
    """The objective runs the student's own k-step sampler from each sample's noise seed: against a bank
    that the same pipeline sampled, its loss is 0 (the noise is replayed exactly); against the teacher's
    full-schedule samples, it is the MSE of the student's k-step samples, recomputed apart; the gradient
    flows through every step into the student only."""
    from ndopt.train.data import collate
    from ndopt.train.step_objectives import TrajectoryDistillation

    captions, seeds = ["a red circle moving left", "a blue square moving up"], [11, 12]
    student = copy.deepcopy(tiny["dit"].module).requires_grad_(True)
    own = tiny.replace(schedule=tiny.schedule.with_steps((2, 2, 2)).with_guidance("none").with_frames(1, 64, 64))
    with_student = own.replace(dit=own["dit"].with_module(student))

    class _Modules:
        def __getitem__(self, name):
            return student

        def raw(self, name):
            return student

    def loss(bank):
        batch = collate([bank[i] for i in range(len(bank))], [0, 1], [0, 0])
        return TrajectoryDistillation(own)(_Modules(), batch, StepInfo(0, 0, 0))

    assert loss(_trajectory_bank(with_student, captions, seeds)).loss.item() < 1e-10
    full = tiny.replace(schedule=tiny.schedule.with_steps((4, 4, 4)).with_frames(1, 64, 64))  # guided, 4 steps
    bank = _trajectory_bank(full, captions, seeds)
    out = loss(bank)
    with torch.no_grad():
        mine = with_student.sampler.sample(with_student, captions, generator=[torch.Generator().manual_seed(s)
                                                                             for s in seeds])
    assert out.loss.item() == pytest.approx(float((mine - bank.latents).pow(2).mean()), rel=1e-4)
    assert out.loss.item() > 1e-3 and math.isfinite(out.metrics["latent_psnr"])
    out.loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in tiny["dit"].module.parameters())
    with pytest.raises(PassError, match="noise seeds"):
        batch = collate([bank[0]], [0], [0])
        TrajectoryDistillation(own)(_Modules(), replace(batch, noise_seeds=None), StepInfo(0, 0, 0))


def test_trajectory_polish_in_the_pass(tiny, tmp_path):
    """trajectory_steps: after DMD (here 0 steps), the student is distilled onto the teacher's own samples
    (a bank of `trajectory_clips` at `trajectory_latent_frames`, cached) and the run is reported."""
    cfg = {"steps": [2, 2, 2], "evaluate": False, "data": {"clips": 2, "frames": 9},
           "train": {"steps": 0, "batch_size": 2, "checkpoint_every": 1, "trajectory_steps": 2,
                     "trajectory_lr": 1e-3, "trajectory_clips": 3, "trajectory_latent_frames": 1}}
    res = StepDistillation(cfg).run(tiny.replace(schedule=tiny.schedule.with_steps((3, 3, 3), (2, 2, 2))),
                                    PassContext(run_dir=tmp_path))
    d = tmp_path  # a pass run by hand writes into the run directory itself
    assert (d / "trajectory" / "metrics.json").is_file()
    from safetensors.torch import load_file

    (bank,) = list((d / "cache").glob("teacher-samples-*"))
    assert load_file(str(bank))["latents"].shape == (3, 16, 1, 8, 8)
    assert res.metrics["trajectory_steps"] == 2 and len(res.metrics["trajectory_loss_curve"]) == 2
    assert not _same(_weights(res.pipeline["dit"].module), _weights(tiny["dit"].module))


def test_trajectory_prompts_over_the_prompt_space(tiny, tmp_path, monkeypatch):
    """trajectory_prompts: prompt_space: the bank's captions span every (colour, shape) pair, the ones the
    training clips hold out included; the default keeps the data's distribution."""
    import passes.step_distillation as sd
    from ndopt.train.data import ProceduralConfig

    asked = []
    real = sd.teacher_samples
    monkeypatch.setattr(sd, "teacher_samples", lambda p, captions, *a, **k: asked.append(list(captions)) or real(
        p, captions, *a, **k))
    held = [f" {c} {s} " for c, s in ProceduralConfig().held_out]
    for prompts in ("data", "prompt_space"):
        cfg = {"steps": [1, 1, 1], "evaluate": False, "data": {"clips": 2, "frames": 1},
               "train": {"steps": 0, "batch_size": 2, "trajectory_steps": 1, "trajectory_clips": 60,
                         "trajectory_latent_frames": 1, "trajectory_prompts": prompts}}
        StepDistillation(cfg).run(tiny.replace(schedule=tiny.schedule.with_steps((1, 1, 1), (1, 1, 1))),
                                  PassContext(run_dir=tmp_path / prompts))
    data, space = asked
    assert len(data) == len(space) == 60 and data != space
    assert not any(h in c for c in data for h in held) and any(h in c for c in space for h in held)
    with pytest.raises(ValidationError, match="trajectory_prompts"):
        StepDistillation({"train": {"trajectory_prompts": "everything"}})


def test_guidance_warm_start_and_teacher_data_in_the_pass(tiny, tmp_path):
    cfg = {"steps": [2, 2, 2], "clean": "teacher", "evaluate": False,
           "train": {"steps": 0, "guidance_steps": 2, "batch_size": 3, "checkpoint_every": 1},
           "data": {"clips": 3, "frames": 1}}
    res = StepDistillation(cfg).run(tiny, PassContext(run_dir=tmp_path))
    d = tmp_path  # a pass run by hand writes into the run directory itself
    assert (d / "guidance" / "metrics.json").is_file() and list((d / "cache").glob("teacher-samples-*"))
    assert not _same(_weights(res.pipeline["dit"].module), _weights(tiny["dit"].module))
    assert res.metrics["train_steps"] == 0 and res.pipeline.schedule.guidance.scale == 1.0


def test_trajectory_distillation_has_no_fake_model_and_writes_a_reusable_student(tiny, tmp_path):
    """dmd_weight 0: every step is the student's (no fake model is built or trained, no fake or real
    score is computed); the run writes student.safetensors, and `student_weights` gives back the
    same student without training."""
    cfg = {"evaluate": False, "data": {"clips": 3, "frames": 1},
           "train": {"steps": 2, "batch_size": 3, "lr": 1e-3, "dmd_weight": 0, "cauchy_weight": 0, "ode_weight": 1,
                     "checkpoint_every": 1}}
    res = StepDistillation(cfg).run(tiny, PassContext(run_dir=tmp_path / "a"))
    trained = _weights(res.pipeline["dit"].module)
    assert not _same(trained, _weights(tiny["dit"].module))
    assert res.metrics["loss_fake_curve"] == [] and len(res.metrics["loss_student_curve"]) == 2
    state = torch.load(next((tmp_path / "a").rglob("step-0000002.pt")), weights_only=True)
    assert not any(k.startswith("fake.") for k in state["modules"])
    again = StepDistillation({**cfg, "student_weights": res.artifacts["student"]}).run(
        tiny, PassContext(run_dir=tmp_path / "b"))
    assert _same(_weights(again.pipeline["dit"].module), trained)
    assert again.pipeline.schedule == res.pipeline.schedule and "train_steps" not in again.metrics


def test_student_weights_are_checked(tiny, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ndopt.errors import CheckpointError

    target = StepDistillation({}).target_schedule(tiny)
    teacher = tiny["dit"].module
    path = save_student(tmp_path / "s.safetensors", teacher, teacher, target, StepDistillation.Config().model_dump())
    assert _same(_weights(load_student(path, teacher, target)), _weights(teacher))
    with pytest.raises(PassError, match="for steps 1-1-1/1-1-1, the config asks for 2-2-2"):
        load_student(path, teacher, StepDistillation({"steps": [2, 2, 2]}).target_schedule(tiny))
    changed = copy.deepcopy(teacher)
    with torch.no_grad():
        next(changed.parameters()).add_(1e-3)
    with pytest.raises(PassError, match="distilled from another teacher"):
        load_student(path, changed, target)
    with pytest.raises(PassError, match="no such file"):
        load_student(tmp_path / "none.safetensors", teacher, target)
    sd = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    dropped = sorted(sd)[0]
    del sd[dropped]
    save_file(sd, str(tmp_path / "short.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=dropped.replace(".", r"\.")):
        load_student(tmp_path / "short.safetensors", teacher, target)
    save_file(sd, str(tmp_path / "plain.safetensors"))
    with pytest.raises(PassError, match="not a student written by step_distillation"):
        load_student(tmp_path / "plain.safetensors", teacher, target)


# ---- resume -----------------------------------------------------------------------------------
def test_resume_after_interruption_matches_an_uninterrupted_run(tiny, distilled, tmp_path, monkeypatch):
    cfg = {**CONFIG, "evaluate": False}
    original = PyramidalDMD.__call__

    def interrupted(self, modules, batch, info):
        if info.step == 4:
            raise KeyboardInterrupt
        return original(self, modules, batch, info)

    monkeypatch.setattr(PyramidalDMD, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        StepDistillation(cfg).run(tiny, PassContext(run_dir=tmp_path))
    monkeypatch.setattr(PyramidalDMD, "__call__", original)
    res = StepDistillation(cfg).run(tiny, PassContext(run_dir=tmp_path))
    assert res.metrics["resumed_from"] == 3
    assert _same(_weights(res.pipeline["dit"].module), _weights(distilled[0]["dit"].module))
    again = StepDistillation(cfg).run(tiny, PassContext(run_dir=tmp_path))  # a rerun loads the saved result
    assert again.metrics["resumed_from"] == 6
    assert _same(_weights(again.pipeline["dit"].module), _weights(res.pipeline["dit"].module))


# ---- idempotence and errors -------------------------------------------------------------------
def test_second_distillation_is_refused(distilled, tmp_path):
    with pytest.raises(PassError, match="already a guidance-free"):
        StepDistillation(CONFIG).run(distilled[0], PassContext(run_dir=tmp_path))


def test_errors(tiny, tmp_path):
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        StepDistillation({"steps": [0, 1, 1]})
    with pytest.raises(ValidationError, match="less than or equal to 1000"):  # a typo would run for days
        StepDistillation({"steps": [1, 100000, 1]})
    with pytest.raises(ValidationError):
        StepDistillation({"stepz": [1, 1, 1]})
    with pytest.raises(ValidationError, match="clean"):  # the new options are checked too
        StepDistillation({"clean": "teachers"})
    with pytest.raises(ValidationError, match="ema_decay"):
        StepDistillation({"train": {"ema_decay": 1.0}})
    with pytest.raises(ValidationError, match="trajectory_clips"):
        StepDistillation({"train": {"trajectory_clips": 0}})
    with pytest.raises(PassError, match="3 pyramid stages"):
        StepDistillation({"steps": [1, 1]}).run(tiny, PassContext(run_dir=tmp_path))
    folded = ScheduleFolding().run(tiny, PassContext(run_dir=tmp_path)).pipeline
    with pytest.raises(PassError, match="before cfg_folding and schedule_folding"):
        StepDistillation(CONFIG).run(folded, PassContext(run_dir=tmp_path))
    no_encoder = tiny.replace(remove=["vae_encoder"])
    with pytest.raises(PassError, match="vae_encoder"):
        StepDistillation(CONFIG).run(no_encoder, PassContext(run_dir=tmp_path))


# ---- plan on the real model -------------------------------------------------------------------
def test_plan_on_the_real_model():
    """49 frames at 768p: 480 DiT calls (REFERENCE: 20-20-20 + 6 x 10-10-10 steps, 2 calls for CFG),
    240 batched, 21 for the guidance-free 1-1-1 student; 18 in Neodragon's hybrid mode."""
    from ndopt.recipe import parse_recipe
    from ndopt.runner import plan

    r = parse_recipe("name: p\nmodel: pyramid-flow-sd3-768p\npasses: [cfg_folding, step_distillation, cfg_folding]\n")
    d = plan(r)
    assert d["latent_frames"] == 7 and d["dit_calls_per_video"] == 480
    calls = [s["dit_calls_per_video"] for s in d["passes"]]
    assert calls == [240, 21, 21]
    assert [s["ratios"]["dit_calls_per_video"] for s in d["passes"]] == [2.0, round(480 / 21, 4), round(480 / 21, 4)]
    base_dit = d["flops_per_video_by_component"]["dit"]
    dit_flops = [s["dit_flops_per_video"] for s in d["passes"]]
    assert dit_flops[0] == base_dit and dit_flops[1] == 2 * dit_flops[2]  # batch 2 until the last cfg_folding
    assert 20 < d["ratios"]["dit_flops_per_video"] < 480 / 21  # first frames are cheaper calls (no history)
    assert d["ratios"]["flops_per_video"] > 4  # the 768p VAE decoder stays
    final = d["passes"][-1]
    assert final["schedule"] == {"steps": [1, 1, 1], "video_steps": [1, 1, 1], "guidance": "none"}
    assert final["calls_per_video"]["text_encoder"] == 1  # no negative prompt


def test_hybrid_mode_calls_match_neodragon(tmp_path):
    from ndopt.frontends import load_model

    meta = load_model("pyramid-flow-sd3-768p", meta=True)
    ctx = PassContext(run_dir=tmp_path, plan=True, device=torch.device("meta"))
    out = CfgFolding().plan(StepDistillation().plan(meta, ctx).pipeline.replace(facts_add=["guidance_free"]),
                            ctx).pipeline
    hybrid = replace(out.schedule, first_frame="external")
    assert hybrid.dit_calls_per_video == 18  # REFERENCE.md: 18 DiT calls per video (hybrid mode)


# ---- the trained tiny teacher and its bundled students ------------------------------------------
RECIPES = Path(__file__).resolve().parents[2] / "recipes"
BUNDLED = {  # the bundled students: the recipe that makes each, its weights' name
    "1-1-1": ("tiny-student.yaml", "pyramid-flow-tiny-student-1-1-1"),
    "4-4-4": ("tiny-student-4-4-4.yaml", "pyramid-flow-tiny-student-4-4-4"),
}


def _recipe_config(steps: str = "1-1-1") -> dict:
    from ndopt.recipe import load_recipe

    spec = load_recipe(RECIPES / BUNDLED[steps][0]).passes[0]
    assert spec.name == "step_distillation"
    return spec.config


def _judge(teacher, pipeline, fid, *, strict: bool = False):
    """The issue's bar: latent PSNR vs the teacher's full schedule above the undistilled teacher at the
    same steps (seed: DMD 80.37 vs undistilled 75.82 VBench), in the mean over the noise draws and in
    the worst draw (`strict`: the worst draw above the undistilled mean), and the teacher's held-out
    prompt-following test still passed, on the student's own schedule without CFG."""
    from ndopt.train.teacher_eval import PROMPT_FOLLOWING_BAR, teacher_prompt_following

    assert fid["student"] > fid["undistilled"] and fid["student_min"] > fid["undistilled_min"], fid
    if strict:
        assert fid["student_min"] > fid["undistilled"], fid
    pf = teacher_prompt_following(pipeline, steps=None)  # the student's own schedule, no CFG
    assert pf.rate >= PROMPT_FOLLOWING_BAR, pf.to_json()
    return pf


def _bundled(steps: str):
    from ndopt.frontends.pyramid_flow.presets import bundled_weights

    path = bundled_weights(BUNDLED[steps][1])
    if bundled_weights("pyramid-flow-tiny") is None or path is None:
        pytest.skip("needs the trained tiny teacher and its bundled student")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # the bundled file is what the recipe makes
        made_by = StepDistillation.Config.model_validate_json(f.metadata()["config"])
    assert made_by.model_dump(exclude={"student_weights"}) == \
        StepDistillation.Config(**_recipe_config(steps)).model_dump(exclude={"student_weights"})
    assert "-".join(map(str, made_by.steps)) == steps  # load_student checks the teacher's fingerprint
    return path


@pytest.mark.slow
def test_bundled_student_beats_the_undistilled_teacher_and_follows_prompts(tmp_path):
    """The bundled 1-1-1 student (weights/pyramid-flow-tiny-student-1-1-1.safetensors), distilled by
    recipes/tiny-student.yaml: a 2000-step guidance-distillation warm start, then 600 steps of Pyramidal
    DMD (the seed's DMD and Cauchy terms) plus the paired ODE regression. Latent PSNR vs the 20-20-20
    teacher, one latent frame, the probe's prompts under 4 noise draws. Measured: student 27.10 dB
    (worst draw 26.60) vs undistilled 1-1-1 21.26 (20.36); held-out prompt following 10/16 = 0.625
    (bar 0.6; the undistilled teacher at 1-1-1: 0.375). The seed's DMD alone (150 steps) gave 24.3 dB
    and 0.5-0.56."""
    from ndopt.frontends import load_model

    path = _bundled("1-1-1")
    teacher = load_model("pyramid-flow-tiny")
    res = StepDistillation({**_recipe_config("1-1-1"), "student_weights": path}).run(
        teacher, PassContext(run_dir=tmp_path))
    assert res.metrics["student_weights"] == str(path) and res.pipeline.schedule.guidance.scale == 1.0
    _judge(teacher, res.pipeline, res.metrics["latent_psnr_vs_teacher"], strict=True)


@pytest.mark.slow
def test_bundled_4_4_4_student_beats_the_undistilled_teacher_and_follows_prompts(tmp_path):
    """The bundled 4-4-4 student (weights/pyramid-flow-tiny-student-4-4-4.safetensors), distilled by
    recipes/tiny-student-4-4-4.yaml: the warm start, then 600 steps of trajectory distillation onto
    1024 teacher samples of captions over the teacher's whole prompt space. The undistilled 4-4-4 sampler
    is a strong baseline on this teacher (its 4-step guided ODE is close to its 20-step one). Measured:
    student 31.73 dB (worst draw 30.69) vs undistilled 31.63 (28.71); on the training captions only the
    same recipe reached 31.27 (29.06). Over 32 draws (not run here): 31.02 (27.42) vs 30.21 (24.66)."""
    from ndopt.frontends import load_model

    path = _bundled("4-4-4")
    teacher = load_model("pyramid-flow-tiny")
    res = StepDistillation({**_recipe_config("4-4-4"), "student_weights": path}).run(
        teacher, PassContext(run_dir=tmp_path))
    assert res.metrics["student_weights"] == str(path) and res.pipeline.schedule.guidance.scale == 1.0
    _judge(teacher, res.pipeline, res.metrics["latent_psnr_vs_teacher"])


@pytest.mark.nightly
@pytest.mark.parametrize("steps", sorted(BUNDLED))
def test_the_student_recipes_from_scratch(tmp_path, steps):
    """The student recipes' distillations, trained from the teacher (1-1-1: ~25 min, 4-4-4: ~60 min on
    2 cores), meet the same bar as their bundled results."""
    from ndopt.frontends import load_model
    from ndopt.frontends.pyramid_flow.presets import bundled_weights

    if bundled_weights("pyramid-flow-tiny") is None:
        pytest.skip("needs the trained tiny teacher (weights/pyramid-flow-tiny.safetensors)")
    teacher = load_model("pyramid-flow-tiny")
    res = StepDistillation(_recipe_config(steps)).run(teacher, PassContext(run_dir=tmp_path))
    _judge(teacher, res.pipeline, res.metrics["latent_psnr_vs_teacher"], strict=steps == "1-1-1")


def test_student_weights_by_bundled_name(tiny, tmp_path):
    """A bare name is a student the frontend ships (what the README's main recipe reuses); an unknown
    name is refused as a missing file."""
    from ndopt.frontends.pyramid_flow.presets import bundled_weights
    from ndopt.model import interface_for
    from passes.step_distillation import StepDistillation

    name = "pyramid-flow-tiny-student-1-1-1"
    assert interface_for(tiny).weights_file(name) == bundled_weights(name)
    res = StepDistillation({"steps": [1, 1, 1], "student_weights": name, "evaluate": False}).run(
        tiny, PassContext(run_dir=tmp_path))
    assert res.metrics["student_weights"] == name and res.pipeline.schedule.stages[0].steps == 1
    with pytest.raises(PassError, match="no such file"):
        StepDistillation({"student_weights": "no-such-student", "evaluate": False}).run(
            tiny, PassContext(run_dir=tmp_path))
