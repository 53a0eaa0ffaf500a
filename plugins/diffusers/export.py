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
    """A diffusers scheduler for the student's sampler, and a record of how well its grid matches."""
    diffusers = require("diffusers")
    times = [float(t) for t in spec.times]
    final_x0 = times[-1] == 0.0
    steps = times[:-1] if final_x0 else times
    k = len(steps)
    known = spec.sampler in ("multistep", "euler", "ddim", "ancestral")
    call = {"num_inference_steps": k, "guidance_scale": 0.0}
    cfg = dict(teacher.scheduler_config)
    if teacher.family == "sd3":
        stochastic = spec.sampler in ("multistep", "ancestral")
        known = spec.sampler != "ancestral" and known
        candidates = [diffusers.FlowMatchEulerDiscreteScheduler.from_config(cfg, stochastic_sampling=stochastic,
                                                                            shift=shift)
                      for shift in (cfg.get("shift", 1.0), 1.0)]
        for sched in candidates:
            sched.set_timesteps(k)
            grid = [float(v) for v in sched.sigmas[:-1]]
            if _close(grid, steps, 1e-3):
                break
        else:
            sched, grid = candidates[0], [float(v) for v in candidates[0].sigmas[:-1]]
        exact = {"sigmas": steps, "max_sequence_length": teacher.config.max_sequence_length}
        tol = 1e-3
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
        exact = {"timesteps": [int(round(t)) for t in steps]} if spec.sampler == "multistep" else {}
        tol = 1.0
    if teacher.family == "sd3":
        call["max_sequence_length"] = teacher.config.max_sequence_length
    matches = known and final_x0 and _close(grid, steps, tol)
    record = {"sampler": spec.sampler, "options": dict(spec.options), "times": times, "num_inference_steps": k,
              "scheduler": type(sched).__name__, "scheduler_grid": grid, "matches_student_sampler": bool(matches),
              "call_kwargs": call}
    if not matches:
        record["exact_grid_kwargs"] = exact
        why = (f"sampler '{spec.sampler}' has no diffusers scheduler" if not known else
               "the student's grid ends without a final denoise" if not final_x0 else
               f"its {k}-step grid {[round(g, 4) for g in grid]} differs from the student's {[round(t, 4) for t in steps]}")
        warn(f"the exported {type(sched).__name__} approximates the student's sampler ({why}); "
             "fewstep_sampling.json in the export folder records the exact grid")
    return sched, record


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
    return diffusers.DiffusionPipeline.from_pretrained(teacher.folder, **missing, **components)


def _save_lora(pipe, teacher, net, dest: str) -> None:
    layers = {k: v.detach().cpu() for k, v in lora_mod.lora_state_dict(net).items()}
    meta = net.peft_config["default"].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    key = teacher.net_name
    type(pipe).save_lora_weights(dest, **{f"{key}_lora_layers": layers, f"{key}_lora_adapter_metadata": meta})
