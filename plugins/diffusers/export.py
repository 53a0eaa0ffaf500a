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
import math
import os
import tempfile

import fsspec
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from core import ops
from core.parameterization import to_x0
from core.registry import warn
from plugins.diffusers import networks
from plugins.diffusers.loading import require

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
        record["exact"] = {"scheduler": "plugins.diffusers.export.FewstepScheduler", "subfolder": "fewstep_scheduler",
                           "call_kwargs": exact_call, "init_noise_sigma": exact.init_noise_sigma,
                           "latents": "randn * init_noise_sigma" if teacher.family == "sd3" else "pipeline"}
    else:
        warn(f"sampler '{spec.sampler}' has no exact diffusers scheduler; the exported {type(sched).__name__} "
             "approximates it (fewstep_sampling.json records the student's grid)")
    return sched, record


def exact_scheduler(teacher, spec):
    """``FewstepScheduler`` holding the student's grid (alpha, sigma per point from fewstep's schedule), or None
    for samplers it does not implement (higher-order teacher solvers)."""
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
    denoiser, shift = student_network(model, spec)
    net = denoiser.net
    dtype = EXPORT_DTYPES[teacher.config.export_dtype]
    is_lora = networks.has_lora(net)
    plain = networks.merged_copy(net) if is_lora else _plain_copy(net)
    if shift is not None:
        networks.fold_time_shift(plain, teacher.family, shift)
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


def student_network(model, spec):
    """(the student's DiffusersDenoiser, a time-embedding shift to fold into it or None). An SFD-v student
    (``NFEConditioned``) is exported for the NFE of ``spec`` (the run's sampling NFE, K model calls): its NFE
    embedding is a constant for that NFE, folded into the time embedding's bias."""
    if isinstance(model, networks.DiffusersDenoiser):
        return model, None
    nfe = spec.options.get("model_kwargs", {}).get("nfe")
    if nfe is None or not hasattr(model, "nfe_embedding"):
        raise TypeError(f"cannot export a {type(model).__name__} student as a diffusers pipeline")
    with torch.no_grad():
        shift = model.nfe_embedding(nfe, 1, next(model.parameters()).device)[0]
    return model.net, shift.float().cpu()


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
    layers = {k: v.detach().cpu() for k, v in networks.lora_state_dict(net).items()}
    meta = net.peft_config["default"].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    key = teacher.net_name
    type(pipe).save_lora_weights(dest, **{f"{key}_lora_layers": layers, f"{key}_lora_adapter_metadata": meta})


# -- the student's own sampler as a diffusers scheduler ---------------------------------------------

SAMPLERS = ("multistep", "ancestral", "euler", "ddim", "euler-afs")


class FewstepScheduler(SchedulerMixin, ConfigMixin):
    """A distilled student's own sampler as a diffusers scheduler, so a pipeline reproduces
    ``python -m core.sample`` exactly (same seed, same images) where no stock scheduler can.

    Stock schedulers differ from fewstep's samplers in three ways that change the images: they start from
    ``noise`` where fewstep starts from sigma(t0) * noise, they re-derive their grids (LCM's skipping, SD3's shift
    applied to the given sigmas), and none has SFD's analytic first step (AFS) or a grid without final denoise.
    This scheduler instead carries the student's grid as data: per grid point the model time, alpha and sigma
    (x_t = alpha x0 + sigma eps, evaluated by fewstep's schedule at export), and applies the same update rules
    (``core.ops``, ``core.parameterization``) as fewstep's samplers (``core.generation``, ``core.pfode``):

    - ``multistep`` (DMD2): x0, then re-noise to the next time with fresh float32 noise;
    - ``ancestral`` (moment matching, Salimans et al. 2024 Alg. 1): z_s ~ q(z_s | z_t, x0) with DDIM(eta) noise,
      in float64;
    - ``euler`` / ``ddim``: x_s = alpha_s x0 + sigma_s (x_t - alpha_t x0) / sigma_t;
    - ``euler-afs`` (SFD): Euler in VE coordinates y = x / alpha; with ``afs`` the first step is analytic, so it is
      folded into ``init_noise_sigma`` (the first model call is at t1) and costs no network call.
    A final time of 0 returns x0; otherwise the last state is the output (SFD's grids end at sigma_min).

    Random draws use the ``generator`` the pipeline passes (SD1.5/SDXL), else torch's global RNG (SD3 passes none):
    ``torch.manual_seed(seed)`` before the call reproduces ``core.sample seed=...``.
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, sampler: str = "multistep", times: list[float] = (), alphas: list[float] = (),
                 sigmas: list[float] = (), prediction_type: str = "epsilon", time_scale: float = 1.0,
                 eta: float = 1.0, afs: bool = False, num_train_timesteps: int = 1000):
        if sampler not in SAMPLERS:
            raise ValueError(f"FewstepScheduler: unknown sampler '{sampler}'; expected one of {', '.join(SAMPLERS)}")
        if not len(times) == len(alphas) == len(sigmas) >= 2:
            raise ValueError("FewstepScheduler needs times, alphas and sigmas of equal length >= 2")
        self.first = 1 if (sampler == "euler-afs" and afs) else 0  # AFS: step 0 is analytic
        self.num_inference_steps = len(times) - 1 - self.first
        self.timesteps = self._model_times("cpu")
        self._step_index = None
        self._begin_index = None

    def _model_times(self, device) -> torch.Tensor:
        """What the network sees: float32 t times the time scale (t * 1000 on flow), as fewstep feeds it."""
        t = torch.tensor(self.config.times[self.first:-1], dtype=torch.float64).to(torch.float32)
        return (t * self.config.time_scale).to(device)

    @property
    def init_noise_sigma(self) -> float:
        """x at the first model call per unit of noise: sigma(t0), or, with AFS, the analytic first step's factor."""
        c = self.config
        if not self.first:
            return float(c.sigmas[0])
        s0, s1 = c.sigmas[0] / c.alphas[0], c.sigmas[1] / c.alphas[1]
        r = s1 / s0
        # y1 = r y0 + (1 - r) D_afs(y0) with D_afs = y (1 - s / sqrt(1 + s^2)) (AMED), y0 = s0 * noise
        return s0 * (r + (1 - r) * (1 - s0 / math.sqrt(1 + s0 * s0))) * c.alphas[1]

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, **unused):
        if num_inference_steps is not None and num_inference_steps != self.num_inference_steps:
            raise ValueError(f"FewstepScheduler reproduces the student's {self.num_inference_steps}-step sampler; "
                             f"call the pipeline with num_inference_steps={self.num_inference_steps}")
        if unused.get("timesteps") is not None or unused.get("sigmas") is not None:
            raise ValueError("FewstepScheduler carries the student's grid; pass no timesteps= or sigmas=")
        self.timesteps = self._model_times(device or "cpu")
        self._step_index = None

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One step of the student's sampler from grid point i to i + 1 (i counts the model calls)."""
        if self._step_index is None:
            self._step_index = self._begin_index or 0
        c, i = self.config, self._step_index + self.first
        f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731  (fewstep's samplers use float64 scalars)
        a_t, s_t, a_s, s_s = f64(c.alphas[i]), f64(c.sigmas[i]), f64(c.alphas[i + 1]), f64(c.sigmas[i + 1])
        x = sample.float()
        x0 = to_x0(model_output.float(), x, a_t.float(), s_t.float(), _PREDICTION[c.prediction_type])
        final = c.times[i + 1] == 0
        if final:
            out = x0
        elif c.sampler == "multistep":
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            out = ops.add_noise(x0, eps, a_s.to(x.dtype), s_s.to(x.dtype))
        elif c.sampler == "ancestral":
            xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float64)
            out = ops.posterior_sample(x.double(), x0.double(), a_t, s_t, a_s, s_s, xi, c.eta).to(x.dtype)
        elif c.sampler == "euler-afs":  # VE coordinates, Python-float coefficients as in core.pfode
            r = (c.sigmas[i + 1] / c.alphas[i + 1]) / (c.sigmas[i] / c.alphas[i])
            out = (r * (x / c.alphas[i]) + (1 - r) * x0) * c.alphas[i + 1]
        else:  # euler / ddim
            out = (a_s * x0 + s_s * (x - a_t * x0) / s_t).to(x.dtype)
        self._step_index += 1
        out = out.to(sample.dtype)
        if not return_dict:
            return (out,)
        return SchedulerOutput(prev_sample=out)

    def __len__(self):
        return self.config.num_train_timesteps


_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "flow_prediction": "flow", "sample": "x0"}
