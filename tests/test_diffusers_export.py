"""``RUN/export`` reproduces fewstep's own sampler: for every objective's student sampler (DMD2 multistep, SFD
Euler + AFS without final denoise, SFD-v's NFE-conditioned student, moment matching's ancestral sampler) on every
teacher family (SD1.5 eps and v, SDXL, SD3 flow), the exported pipeline, loaded back with ``from_pretrained``
and given ``FewstepScheduler`` and the recorded call arguments, gives the images ``core.generation.generate``
gives for the same seed."""

from __future__ import annotations

import functools
import json

import attrs

import pytest
import torch

pytest.importorskip("diffusers")

from tiny_pipelines import sd3_dir, sd15_dir, sd15_v_dir, sdxl_dir  # noqa: E402,F401  (fixtures)

from core.registry import get_registry  # noqa: E402
from core.generation import generate  # noqa: E402

PROMPTS = ["a red cube", "two cats on a mat"]
SEQ3 = 16


@functools.lru_cache(maxsize=None)
def teacher_for(path: str, family: str, resolution=None):
    from plugins.diffusers.teacher import DiffusersTeacher, DiffusersTeacherConfig

    return DiffusersTeacher(DiffusersTeacherConfig(path=path, max_sequence_length=SEQ3, resolution=resolution),
                            "cpu", family)


def perturbed_student(teacher, lora_rank: int = 0, nfe_conditioned: bool = False):
    """A trainable copy moved away from the teacher (a trained student's stand-in), optionally LoRA, or SFD-v's
    NFE-conditioned copy (``student=copy-nfe``, its zero-initialised NFE embedding moved too)."""
    from plugins.diffusers.networks import NetConfig, add_lora

    if nfe_conditioned:
        entry = get_registry().get("student", "copy-nfe")
        student = entry.factory(entry.config(), teacher)
    else:
        student = teacher.trainable_copy()
    if lora_rank:
        add_lora(student, NetConfig(lora_rank=lora_rank))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if p.requires_grad:  # the NFE embedding starts at zero: moved further, as training would
                p.add_(torch.randn(p.shape, generator=gen) * (0.3 if name.startswith("nfe_embed") else 0.02))
    return student.eval()


def objective_spec(name: str, overrides: dict, student):
    reg = get_registry()
    entry = reg.get("objective", name)
    return entry.factory(entry.config(**overrides)).sampling(student)


def fewstep_images(teacher, student, spec, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    cond = teacher.encode_condition(PROMPTS)
    z = generate(student, spec, len(PROMPTS), cond, get_registry(), "cpu", batch=8, shape=teacher.data_shape)
    return teacher.to_data_space(z) / 2 + 0.5


def exported_images(export: str, family: str, seed: int) -> tuple[torch.Tensor, dict]:
    """What the docs tell a user to run: the export, FewstepScheduler, the recorded call, torch.manual_seed."""
    from diffusers import DiffusionPipeline

    from plugins.diffusers.export import FewstepScheduler

    record = json.load(open(f"{export}/fewstep_sampling.json"))
    exact = record["exact"]
    extra = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}
    pipe = DiffusionPipeline.from_pretrained(export, **extra)
    pipe.scheduler = FewstepScheduler.from_pretrained(export, subfolder=exact["subfolder"])
    pipe.set_progress_bar_config(disable=True)
    call = dict(exact["call_kwargs"])
    torch.manual_seed(seed)
    if exact["latents"] != "pipeline":  # SD3's pipeline does not scale its initial noise
        c = pipe.transformer.config.in_channels
        shape = (len(PROMPTS), c, call["height"] // pipe.vae_scale_factor, call["width"] // pipe.vae_scale_factor)
        call["latents"] = torch.randn(shape) * pipe.scheduler.init_noise_sigma
    with torch.no_grad():
        return pipe(PROMPTS, output_type="pt", **call).images, record


OBJECTIVES = {  # objective -> (config overrides, its student sampler)
    "dmd2": ({"steps": 3}, "multistep"),
    "sfd": ({"nfe": 2, "substeps": 1, "sigma_min": 0.05}, "euler-afs"),
    "sfd-noafs": ({"nfe": 2, "substeps": 1, "afs": False}, "euler-afs"),
    "mm": ({"steps": 3}, "ancestral"),
    "mm-param": ({"steps": 2, "sample_eta": 0.5}, "ancestral"),
    "sfd-v": ({"nfe": 3, "nfe_min": 2, "nfe_max": 4, "substeps": 1, "sigma_min": 0.05}, "euler-afs"),
}
FAMILIES = ["sd15", "sd15_v", "sdxl", "sd3"]


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("which", FAMILIES)
def test_export_reproduces_core_generation(which, objective, request, tmp_path):
    from plugins.diffusers.export import export_pipeline

    name = objective.split("-noafs")[0]
    if name not in get_registry().plugins["objective"]:
        pytest.fail(f"objective {name} is not registered: its built-in entry point is lost")
    family = which.split("_")[0]
    teacher = teacher_for(request.getfixturevalue(f"{which}_dir"), family)
    student = perturbed_student(teacher, nfe_conditioned=name == "sfd-v")
    overrides, sampler = OBJECTIVES[objective]
    spec = objective_spec(name, overrides, student)
    assert spec.sampler == sampler
    if name == "sfd-v":  # the student is conditioned on the sampling NFE, and the condition changes its images
        assert spec.options["model_kwargs"] == {"nfe": 3}
        unconditioned = fewstep_images(teacher, student.net, attrs.evolve(spec, options={"afs": True}), seed=3)
        assert float((unconditioned - fewstep_images(teacher, student, spec, seed=3)).abs().max()) > 1e-2
    export = export_pipeline(teacher, student, spec, str(tmp_path))
    ours = fewstep_images(teacher, student, spec, seed=3)
    theirs, record = exported_images(export, family, seed=3)
    calls = len(spec.times) - 1 - int(sampler == "euler-afs" and spec.options.get("afs", True))  # AFS: no call
    assert record["exact"]["call_kwargs"]["num_inference_steps"] == calls
    assert theirs.shape == ours.shape
    err = float((theirs - ours).abs().max())
    assert err <= 1e-3, f"{which}/{objective}: exported pipeline differs from core.generation by {err:.2e}"
    other = fewstep_images(teacher, student, spec, seed=4)  # the seed matters: the comparison is not vacuous
    assert float((other - ours).abs().max()) > 1e-2


def test_stock_sd3_scheduler_uses_the_students_sigmas_unshifted(sd3_dir, tmp_path):
    """SD3's FlowMatch scheduler shifts the sigmas it is given by its `shift`; the export records shift 1, so a
    plain-diffusers call with the recorded sigmas runs exactly the student's grid."""
    from diffusers import DiffusionPipeline

    from plugins.diffusers.export import export_pipeline

    teacher = teacher_for(sd3_dir, "sd3")
    assert teacher.scheduler_config["shift"] == 3.0
    student = perturbed_student(teacher)
    spec = objective_spec("dmd2", {"steps": 4}, student)
    export = export_pipeline(teacher, student, spec, str(tmp_path))
    record = json.load(open(f"{export}/fewstep_sampling.json"))
    pipe = DiffusionPipeline.from_pretrained(export, text_encoder_3=None, tokenizer_3=None)
    pipe.scheduler.set_timesteps(sigmas=record["call_kwargs"]["sigmas"])
    assert [float(s) for s in pipe.scheduler.sigmas[:-1]] == pytest.approx(spec.times[:-1], abs=1e-6)
    assert record["matches_student_sampler"]


def test_scheduler_refuses_other_step_counts():
    from plugins.diffusers.export import FewstepScheduler

    sched = FewstepScheduler(sampler="euler", times=[999.0, 499.0, 0.0], alphas=[0.07, 0.5, 1.0],
                             sigmas=[0.997, 0.86, 0.0])
    assert sched.num_inference_steps == 2 and sched.timesteps.tolist() == [999.0, 499.0]
    with pytest.raises(ValueError, match="num_inference_steps=2"):
        sched.set_timesteps(4)


@pytest.mark.parametrize("which", ["sdxl", "sd3"])
def test_non_square_export_reproduces_core_generation(which, request, tmp_path):
    """teacher.resolution=[H,W]: the recorded call carries height/width (SDXL: its size conditioning), and the
    export still gives fewstep's images."""
    from plugins.diffusers.export import export_pipeline

    teacher = teacher_for(request.getfixturevalue(f"{which}_dir"), which, resolution=(16, 24))
    student = perturbed_student(teacher)
    spec = objective_spec("dmd2", {"steps": 2}, student)
    export = export_pipeline(teacher, student, spec, str(tmp_path))
    ours = fewstep_images(teacher, student, spec, seed=1)
    theirs, record = exported_images(export, which, seed=1)
    assert record["exact"]["call_kwargs"]["height"] == 16 and record["exact"]["call_kwargs"]["width"] == 24
    assert theirs.shape == ours.shape == (2, 3, 16, 24)
    assert float((theirs - ours).abs().max()) <= 1e-3
