"""``FewstepScheduler``: a distilled student's own sampler as a diffusers scheduler, so a pipeline reproduces
``python -m core.sample`` exactly (same seed, same images) where no stock scheduler can.

Stock schedulers differ from fewstep's samplers in three ways that change the images: they start from
``noise`` where fewstep starts from sigma(t0) * noise, they re-derive their grids (LCM's skipping, SD3's shift
applied to the given sigmas), and none has SFD's analytic first step (AFS) or a grid without final denoise.
This scheduler instead carries the student's grid as data: per grid point the model time, alpha and sigma
(x_t = alpha x0 + sigma eps, evaluated by fewstep's schedule at export), and applies the same update rules
(``core.ops``, ``core.parameterization``) as fewstep's samplers (``core.generation``, ``core.pfode``):

- ``multistep`` (DMD2): x0, then re-noise to the next time with fresh float32 noise;
- ``ancestral`` (moment matching, Salimans et al. 2024 Alg. 1): z_s ~ q(z_s | z_t, x0) with DDIM(eta) noise, float64;
- ``euler`` / ``ddim``: x_s = alpha_s x0 + sigma_s (x_t - alpha_t x0) / sigma_t;
- ``euler-afs`` (SFD): Euler in VE coordinates y = x / alpha; with ``afs`` the first step is analytic, so it is
  folded into ``init_noise_sigma`` (the first model call is at t1) and costs no network call.
A final time of 0 returns x0; otherwise the last state is the output (SFD's grids end at sigma_min).

Random draws use the ``generator`` the pipeline passes (SD1.5/SDXL), else torch's global RNG (SD3 passes none):
``torch.manual_seed(seed)`` before the call reproduces ``core.sample seed=...``.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from core import ops
from core.parameterization import to_x0

SAMPLERS = ("multistep", "ancestral", "euler", "ddim", "euler-afs")


class FewstepScheduler(SchedulerMixin, ConfigMixin):
    """A fixed K-step grid with the student's update rule (see the module docstring)."""

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
