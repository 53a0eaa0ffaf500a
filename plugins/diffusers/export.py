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
    stochastic = spec.sampler == "multistep"
    cfg = dict(teacher.scheduler_config)
    if teacher.family == "sd3":
        sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(cfg, stochastic_sampling=stochastic)
        sched.set_timesteps(k)
        grid = [float(s) for s in sched.sigmas[:-1]]
        if max(abs(a - b) for a, b in zip(grid, steps)) > 1e-3:
            plain = diffusers.FlowMatchEulerDiscreteScheduler.from_config(cfg, stochastic_sampling=stochastic,
                                                                          shift=1.0)
            plain.set_timesteps(k)
            if max(abs(float(a) - b) for a, b in zip(plain.sigmas[:-1], steps)) <= 1e-3:
                sched, grid = plain, [float(s) for s in plain.sigmas[:-1]]
        tol, call = 1e-3, {"sigmas": steps}
    else:
        keep = {k2: v for k2, v in cfg.items() if not k2.startswith("_")}
        if stochastic:
            sched = diffusers.LCMScheduler.from_config(keep, original_inference_steps=k, timestep_scaling=1000.0,
                                                       clip_sample=False, thresholding=False)
        else:
            sched = diffusers.DDIMScheduler.from_config(keep, timestep_spacing="trailing", set_alpha_to_one=True,
                                                        clip_sample=False, thresholding=False, steps_offset=0)
        sched.set_timesteps(k)
        grid = [float(t) for t in sched.timesteps]
        tol, call = 1.0, {"timesteps": [int(round(t)) for t in steps]} if stochastic else {}
    matches = final_x0 and len(grid) == k and max(abs(a - b) for a, b in zip(grid, steps)) <= tol
    record = {"sampler": spec.sampler, "times": times, "num_inference_steps": k, "scheduler": type(sched).__name__,
              "scheduler_grid": grid, "matches_student_grid": bool(matches),
              "usage": f"pipe(prompt, num_inference_steps={k}, guidance_scale=0)"}
    if not matches:
        record["exact_call_kwargs"] = call
        warn(f"the exported {type(sched).__name__}'s {k}-step grid {grid} differs from the student's {steps}"
             + ("" if final_x0 else " (which ends without a final denoise)")
             + f"; see fewstep_sampling.json for the exact call")
    return sched, record


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
    missing = {k: None for k in expected if k not in index and k not in components}
    return diffusers.DiffusionPipeline.from_pretrained(teacher.folder, **missing, **components)


def _save_lora(pipe, teacher, net, dest: str) -> None:
    layers = {k: v.detach().cpu() for k, v in lora_mod.lora_state_dict(net).items()}
    meta = net.peft_config["default"].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    key = teacher.net_name
    type(pipe).save_lora_weights(dest, **{f"{key}_lora_layers": layers, f"{key}_lora_adapter_metadata": meta})
