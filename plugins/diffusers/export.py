"""``RUN/export``: the student as a diffusers pipeline folder that generates with plain diffusers.

The folder is the teacher's pipeline with the distilled UNet / transformer (a LoRA student is merged into
it) and a scheduler that reproduces the student's sampler on its time grid:
- ``multistep`` (denoise, then re-noise with fresh noise: DMD2, MM) on SD1.5/SDXL -> ``LCMScheduler`` with
  ``original_inference_steps = K``, whose K-step timesteps are 999, 999-1000/K, ... (999/749/499/249 for K=4);
- ``euler`` / ``ddim`` (deterministic DDIM) -> ``DDIMScheduler`` with trailing spacing (the same timesteps);
- SD3: ``FlowMatchEulerDiscreteScheduler`` (``stochastic_sampling`` for multistep).
A LoRA student also gets ``RUN/export/lora/pytorch_lora_weights.safetensors`` for ``load_lora_weights``.
``fewstep_sampling.json`` records the grid and the call (``num_inference_steps=K, guidance_scale=0``) and
whether the scheduler's default K-step grid matches the student's grid.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile

import fsspec
import torch

from core.registry import warn
from plugins.diffusers import lora as lora_mod
from plugins.diffusers._require import require

EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def student_scheduler(teacher, spec) -> tuple[object, dict]:
    """The closest stock diffusers scheduler for the student's sampler, and the record of the export: the stock
    scheduler's grid and call, and the exact recipe through ``FewstepScheduler``."""
    diffusers = require("diffusers")
    times = [float(t) for t in spec.times]
    final_x0 = times[-1] == 0.0
    steps = times[:-1] if final_x0 else times
    k = len(steps)
    known = spec.sampler in ("multistep", "euler", "ddim", "ancestral")
    size = {"height": teacher.resolution[0], "width": teacher.resolution[1]}
    call = {"num_inference_steps": k, "guidance_scale": 0.0, **size}
    cfg = dict(teacher.scheduler_config)
    if teacher.family == "sd3":
        known = spec.sampler in ("multistep", "euler", "ddim")
        # shift 1 and no dynamic shifting: the given sigmas are used as they are (SD3 re-shifts them otherwise)
        sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(
            cfg, stochastic_sampling=spec.sampler == "multistep", shift=1.0, use_dynamic_shifting=False)
        call = {"sigmas": steps, "guidance_scale": 0.0, **size,
                "max_sequence_length": teacher.config.max_sequence_length}
        sched.set_timesteps(sigmas=steps)
        grid = [float(v) for v in sched.sigmas[:-1]]
        tol = 1e-6
    else:
        if spec.sampler == "multistep":  # denoise then re-noise with fresh noise: LCM's step
            sched = diffusers.LCMScheduler.from_config(_accepted(diffusers.LCMScheduler, cfg),
                                                       original_inference_steps=k, timestep_scaling=1000.0,
                                                       clip_sample=False, thresholding=False)
        else:  # DDIM(eta): euler/ddim (eta 0) and ancestral (eta from the spec, passed at call time)
            sched = diffusers.DDIMScheduler.from_config(_accepted(diffusers.DDIMScheduler, cfg),
                                                        timestep_spacing="trailing", set_alpha_to_one=True,
                                                        clip_sample=False, thresholding=False, steps_offset=0)
            if spec.sampler == "ancestral":
                call["eta"] = float(spec.options.get("eta", 1.0))
        sched.set_timesteps(k)
        grid = [float(t) for t in sched.timesteps]
        tol = 1.0
    matches = known and final_x0 and _close(grid, steps, tol)
    record = {"sampler": spec.sampler, "options": dict(spec.options), "times": times, "num_inference_steps": k,
              "scheduler": type(sched).__name__, "scheduler_grid": grid, "matches_student_sampler": bool(matches),
              "call_kwargs": call}
    exact = exact_scheduler(teacher, spec)
    if exact is not None:
        exact_call = {**size, "num_inference_steps": exact.num_inference_steps, "guidance_scale": 0.0}
        if teacher.family == "sd3":
            exact_call["max_sequence_length"] = teacher.config.max_sequence_length
        record["exact"] = {"scheduler": "plugins.diffusers.scheduler.FewstepScheduler", "subfolder": "fewstep_scheduler",
                           "call_kwargs": exact_call, "init_noise_sigma": exact.init_noise_sigma,
                           "latents": "randn * init_noise_sigma" if teacher.family == "sd3" else "pipeline"}
    else:
        warn(f"sampler '{spec.sampler}' has no exact diffusers scheduler; the exported {type(sched).__name__} "
             "approximates it (fewstep_sampling.json records the student's grid)")
    return sched, record


def exact_scheduler(teacher, spec):
    """``FewstepScheduler`` holding the student's grid (alpha, sigma per point from fewstep's schedule), or None
    for samplers it does not implement (higher-order teacher solvers)."""
    from plugins.diffusers.scheduler import SAMPLERS, FewstepScheduler

    if spec.sampler not in SAMPLERS:
        return None
    schedule, times = teacher.schedule, [float(t) for t in spec.times]
    point = lambda t, f: float(f(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
    alphas = [1.0 if t == 0 else point(t, schedule.alpha) for t in times]
    sigmas = [0.0 if t == 0 else point(t, schedule.sigma) for t in times]
    prediction = "flow_prediction" if teacher.prediction == "flow" else teacher.scheduler_config.get(
        "prediction_type", "epsilon")
    return FewstepScheduler(sampler=spec.sampler, times=times, alphas=alphas, sigmas=sigmas,
                            prediction_type=prediction, time_scale=float(teacher.denoiser.time_scale),
                            eta=float(spec.options.get("eta", 1.0)), afs=bool(spec.options.get("afs", True)),
                            num_train_timesteps=int(teacher.scheduler_config.get("num_train_timesteps", 1000)))


def _accepted(cls, cfg: dict) -> dict:
    """The teacher scheduler's settings that ``cls`` takes (betas, prediction type, ...), nothing else."""
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in cfg.items() if k in params}


def _close(a: list[float], b: list[float], tol: float) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


def export_pipeline(teacher, model, spec, out_dir: str) -> str:
    """Write ``out_dir/export`` (any fsspec URL: built locally, then uploaded)."""
    remote = "://" in out_dir
    local_root = tempfile.mkdtemp(prefix="fewstep-export-") if remote else out_dir
    dest = os.path.join(local_root, "export")
    net = model.net
    dtype = EXPORT_DTYPES[teacher.config.export_dtype]
    is_lora = lora_mod.has_lora(net)
    plain = lora_mod.merged_copy(net) if is_lora else _plain_copy(net)
    plain = plain.to(dtype).eval()
    sched, record = student_scheduler(teacher, spec)
    pipe = _pipeline_with(teacher, {teacher.net_name: plain, "scheduler": sched})
    pipe.save_pretrained(dest)
    exact = exact_scheduler(teacher, spec)
    if exact is not None:
        exact.save_pretrained(os.path.join(dest, "fewstep_scheduler"))
    if is_lora:
        _save_lora(pipe, teacher, net, os.path.join(dest, "lora"))
        record["lora"] = "lora/pytorch_lora_weights.safetensors (pipe.load_lora_weights on the teacher pipeline)"
    with open(os.path.join(dest, "fewstep_sampling.json"), "w") as f:
        json.dump(record, f, indent=1)
    if remote:
        fs, path = fsspec.core.url_to_fs(out_dir)
        fs.put(dest + "/", path.rstrip("/") + "/export/", recursive=True)
        return out_dir.rstrip("/") + "/export"
    return dest


def _plain_copy(net):
    plain = type(net).from_config(net.config)
    plain.load_state_dict({k: v.detach().float().cpu() for k, v in net.state_dict().items()})
    return plain


def _pipeline_with(teacher, components: dict):
    """The teacher's pipeline from its folder (stored dtypes, CPU) with some components replaced."""
    diffusers = require("diffusers")
    with open(os.path.join(teacher.folder, "model_index.json")) as f:
        index = json.load(f)
    cls = getattr(diffusers, index["_class_name"])
    expected, _ = cls._get_signature_keys(cls)
    missing = {k: None for k in expected if index.get(k, [None])[0] is None and k not in components}
    variant = {"variant": teacher.config.variant} if teacher.config.variant else {}
    return diffusers.DiffusionPipeline.from_pretrained(teacher.folder, **missing, **components, **variant)


def _save_lora(pipe, teacher, net, dest: str) -> None:
    layers = {k: v.detach().cpu() for k, v in lora_mod.lora_state_dict(net).items()}
    meta = net.peft_config["default"].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    key = teacher.net_name
    type(pipe).save_lora_weights(dest, **{f"{key}_lora_layers": layers, f"{key}_lora_adapter_metadata": meta})
