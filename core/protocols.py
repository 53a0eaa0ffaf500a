"""The protocols every plugin implements.

One denoiser convention serves every network role: ``denoise(x_t, t, cond) -> x0_hat`` on a
``NoiseSchedule`` (``core.schedules``), with t a [B] tensor in that schedule's units. Samplers and
objectives need nothing else, which is what lets one method run on a Gaussian mixture, an EDM MLP and
an SDXL UNet.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

import attrs
import torch
from torch import Tensor

from core.schedules import NoiseSchedule


@runtime_checkable
class Denoiser(Protocol):
    """Anything that maps a noisy x_t at time t to its estimate of x0."""

    schedule: NoiseSchedule

    def denoise(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor: ...


@runtime_checkable
class Teacher(Denoiser, Protocol):
    """A frozen pretrained model (or an exact one).

    - ``data_shape``: shape of one sample in model space (latents for VAE models).
    - ``denoise(x_t, t, cond, guidance=None)``: x0 with classifier-free guidance scale ``guidance``
      (None or 1: no guidance); ``cond=None`` is the unconditional model.
    - ``encode_condition(raw)``: raw conditions from a Dataset (labels, prompts) -> what ``denoise`` takes.
    - ``to_model_space`` / ``to_data_space``: VAE encode/decode (identity without a VAE).
    - ``trainable_copy()``: a fresh trainable ``torch.nn.Module`` denoiser initialised from the
      teacher's network, or None when the teacher has no network (exact teachers).

    Optional attributes, with what the framework assumes when one is absent:
    ``num_classes`` (0: unconditional), ``sigma_data`` (0.5; ``sigma_data_of``, also on students and
    critics), ``guidance`` (None: the default CFG scale of objectives and ``core.sample``),
    ``preview_samples`` (16: the preview size when there is nothing to score against),
    ``gan_feature_module`` / ``gan_feature_shape`` (None: DMD2's GAN head reads the critic's MLP trunk and
    probes the shape), ``sample_exact(n, labels=None)`` (absent: no quality metrics during training),
    ``export(model, spec, out)`` (absent: only ``student.safetensors``), ``real_data_hint`` (what moment
    matching suggests to a run without real data; absent: data=gmm / data=teacher-samples), ``expensive_calls``
    (False: a call is cheap enough that objectives may spend optional extra teacher calls by default, such as
    DMD's regression targets; the diffusers pipelines say True).
    """

    data_shape: tuple[int, ...]

    def encode_condition(self, raw: Any) -> Any: ...

    def to_model_space(self, x: Tensor) -> Tensor: ...

    def to_data_space(self, z: Tensor) -> Tensor: ...

    def trainable_copy(self) -> torch.nn.Module | None: ...


@runtime_checkable
class Student(Denoiser, Protocol):
    """The trainable few-step generator: a ``torch.nn.Module`` with ``denoise`` and ``schedule``."""

    def parameters(self) -> Iterable[torch.nn.Parameter]: ...


@runtime_checkable
class Critic(Denoiser, Protocol):
    """A trainable auxiliary network (fake score, auxiliary denoiser), a ``torch.nn.Module`` with ``denoise``."""

    def parameters(self) -> Iterable[torch.nn.Parameter]: ...


@runtime_checkable
class Dataset(Protocol):
    """Real data and conditions. ``sample(n)`` returns ``{"x": Tensor | None, "cond": raw | None}``,
    x in data space. Randomness comes from torch's global RNG so runs resume exactly."""

    def sample(self, n: int) -> dict: ...


def time_batch(t: float | Tensor, x: Tensor) -> Tensor:
    """``t`` (a scalar or [B]) as the [B] time tensor ``denoise`` takes for the batch ``x``: float32, or
    float64 for a float64 batch."""
    dtype = x.dtype if x.dtype == torch.float64 else torch.float32
    return torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0]).to(dtype)


def sigma_data_of(*models, default: float = 0.5) -> float:
    """The data standard deviation of the first of ``models`` that declares one (``sigma_data``, optional on
    teachers, students and critics), else ``default``; preconditioning and EDM weighting read it."""
    for model in models:
        value = getattr(model, "sigma_data", None)
        if value:
            return value
    return default


# A sampler is a plain function (k-diffusion style):
#   sampler(model, noise, times, cond=None, *, return_trajectory=False, **options) -> x  (or (x, [x_i]))
# ``model`` is a Denoiser, ``noise`` is unit Gaussian, ``times`` a decreasing 1-D tensor in the
# schedule's units; the sampler starts from x = sigma(times[0]) * noise.
Sampler = Callable[..., Any]


@attrs.frozen
class Phase:
    """One update phase of an objective.

    ``trains`` names the networks whose parameters this phase's optimizer steps (``student``,
    ``critic`` or an objective's own module). The phase runs on iterations where
    ``iteration % every == offset``, ``repeats`` times in a row (e.g. several critic updates per generator
    update); each run makes one optimizer step per loss the objective gives (see ``DistillObjective.loss``).
    """

    name: str
    trains: tuple[str, ...] = attrs.field(converter=lambda v: (v,) if isinstance(v, str) else tuple(v))
    every: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    offset: int = 0
    repeats: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float | None = None


@attrs.frozen
class SamplingSpec:
    """How a trained student generates: a sampler plugin, its time grid and options (JSON-able)."""

    sampler: str
    times: list[float]
    options: dict = attrs.field(factory=dict)


class Context:
    """What an objective sees in one phase call: networks, real data batch, iteration and a
    per-iteration cache (shared by the phases of one iteration, cleared after it). The batch's rows are
    rows ``row_offset ..`` of the step's ``global_batch`` (over ranks and micro-batches), for objectives that
    treat rows by their place in the whole batch."""

    def __init__(self, nets: dict, batch: dict, iteration: int, batch_size: int, device, cache=None,
                 row_offset: int = 0, global_batch: int | None = None):
        self.nets = nets
        self.batch = batch
        self.iteration = iteration
        self.batch_size = batch_size
        self.device = device
        self.cache = {} if cache is None else cache
        self.row_offset = row_offset
        self.global_batch = batch_size if global_batch is None else global_batch

    @property
    def teacher(self):
        return self.nets["teacher"]

    @property
    def student(self):
        return self.nets["student"]

    @property
    def critic(self):
        return self.nets.get("critic")


@runtime_checkable
class DistillObjective(Protocol):
    """A method. It declares what it needs and computes losses; the runner does the rest
    (optimizers, backward, clipping, stepping, autocast, EMA, logging, checkpoints).

    - ``needs_critic``: whether the runner must build a critic (``critic=`` plugin).
    - ``build(nets) -> dict[str, nn.Module]``: extra trainable modules owned by the objective
      (e.g. a GAN head); called once after the networks exist.
    - ``phases() -> list[Phase]``
    - ``loss(phase, ctx) -> (loss, metrics)``: the scalar to minimise for that phase and a dict of floats
      or 0-d tensors to log; or a generator of such pairs when the method's algorithm updates several
      times in one iteration (SFD's Algorithm 1): the runner makes one optimizer step after each.
    - ``sampling(student) -> SamplingSpec``: how the trained student generates (times in the
      student schedule's units).
    """

    needs_critic: bool

    def build(self, nets: dict) -> dict: ...

    def phases(self) -> list[Phase]: ...

    def loss(self, phase: str, ctx: Context) -> tuple[Tensor, dict] | Iterator[tuple[Tensor, dict]]: ...

    def sampling(self, student) -> SamplingSpec: ...

    def with_steps(self, spec: SamplingSpec, steps: int, student) -> SamplingSpec:
        """Optional: the spec for ``python -m core.sample run=... steps=K``. Without it the trained sampler
        runs on a K-step grid of the same kind."""
        ...


def phase_losses(objective, phase: str, ctx: Context) -> Iterator[tuple[Tensor, dict]]:
    """The (loss, metrics) pairs of one phase call, whichever form the objective returns."""
    out = objective.loss(phase, ctx)
    if isinstance(out, tuple):
        yield out
    else:
        yield from out
