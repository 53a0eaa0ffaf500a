"""The hot-path tensor math of every method, as named ops.

Objectives call these rather than writing the arithmetic inline, so one place decides how they run:
the fused Triton kernels in ``core.kernels`` (CUDA tensors, or anywhere with ``FEWSTEP_KERNELS=triton``
under TRITON_INTERPRET=1) or the torch reference beside each kernel (everything else, float64 included).
See ``core/kernels/dispatch.py`` for the rule and docs/kernels.md for the layout. On the Triton path,
calls under torch.compile go through the registered custom ops (``torch.ops.fewstep.*``); eager calls
skip the dispatcher. Each op is one ``KernelOp`` entry point (``core/kernels/_triton.py``) behind one
``_fused`` check.
All per-sample factors (alpha, sigma, weights) have shape [B] or are scalars.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.kernels import dispatch


def add_noise(x0: Tensor, eps: Tensor, alpha, sigma) -> Tensor:
    """Forward noising x_t = alpha x0 + sigma eps."""
    from core.kernels import add_noise as k

    fused = _fused((x0, eps), (alpha, sigma))
    if fused is None:
        return k.add_noise_reference(x0, eps, alpha, sigma)
    return k.ADD_NOISE(x0, eps, *fused)


def add_fresh_noise(x0: Tensor, alpha, sigma, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(x_t, eps) with eps ~ N(0, I) drawn here: in-kernel Philox on the Triton path (no eps read from memory).

    The two paths draw different (equally distributed) noise. The Philox seed comes from ``generator`` (or
    torch's default CPU generator), so ``torch.manual_seed`` makes both paths reproducible.
    """
    from core.kernels import add_noise as k

    fused = _fused((x0,), (alpha, sigma))
    if fused is None:
        return k.add_fresh_noise_reference(x0, alpha, sigma, generator)
    gen_device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2**31 - 1, (), generator=generator, device=gen_device))
    return k.ADD_FRESH_NOISE(x0, *fused, seed)


def guided_x0(pred_cond: Tensor, pred_uncond: Tensor | None, x_t: Tensor, alpha, sigma, scale: float,
              prediction: str) -> Tensor:
    """Classifier-free guidance on the raw outputs, then conversion to x0.

    Guidance is linear, so combining outputs then converting equals converting then combining.
    """
    return _guided(pred_cond, pred_uncond, x_t, alpha, sigma, scale, prediction, "x0")


def guided_score(pred_cond: Tensor, pred_uncond: Tensor | None, x_t: Tensor, alpha, sigma, scale: float,
                 prediction: str) -> Tensor:
    """Like ``guided_x0`` but returns the score grad log p_t(x_t) = (alpha x0 - x_t) / sigma^2 (Tweedie)."""
    return _guided(pred_cond, pred_uncond, x_t, alpha, sigma, scale, prediction, "score")


def _guided(pred_cond, pred_uncond, x_t, alpha, sigma, scale, prediction, output):
    from core.kernels import guided_x0 as k

    fused = _fused((pred_cond, pred_uncond, x_t), (alpha, sigma))
    if fused is None:
        return k.guided_x0_reference(pred_cond, pred_uncond, x_t, alpha, sigma, scale, prediction, output)
    return k.GUIDED_X0(pred_cond, pred_uncond, x_t, *fused, float(scale), prediction, output)


def dmd_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """DMD2's normalised distribution-matching gradient (Yin et al. 2024, eq. 8 as in their code).

    g = (x0_fake - x0_real) / mean_{non-batch}|x - x0_real|, non-finite entries set to 0, in x's dtype
    promoted to at least float32 (fp16 inputs would overflow). The torch reference computes in float64 (as
    the reference code converts); the kernel in fp32.
    """
    from core.kernels import dmd as k

    if _fused((x, x0_real, x0_fake)) is None:
        return k.dmd_gradient_reference(x, x0_real, x0_fake)
    return k.DMD_GRADIENT_LOSS(x.detach(), x0_real.detach(), x0_fake.detach())[0]


def dmd_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """0.5 * mean((x - sg(x - g))^2) = 0.5 mean(g^2): a loss whose gradient w.r.t. x is g / x.numel().

    The value is in x's dtype promoted to at least float32; the gradient reaches x in x's dtype."""
    from core.kernels import dmd as k

    if _fused((x, x0_real, x0_fake)) is None:
        return k.dmd_loss_reference(x, x0_real, x0_fake)
    return k.DMD_GRADIENT_LOSS(x, x0_real.detach(), x0_fake.detach())[1]


def posterior_sample(z_t: Tensor, x0: Tensor, alpha_t, sigma_t, alpha_s, sigma_s, noise: Tensor | None,
                     eta: float = 1.0) -> Tensor:
    """Draw z_s from the DDIM(eta) posterior q(z_s | z_t, x0) for s < t.

    eta = 1 is the exact Gaussian posterior of the forward process; eta = 0 is deterministic DDIM.
    Standard algebra: with sigma_{t|s}^2 = sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2, the posterior std is
    c = eta * sigma_s * sigma_{t|s} / sigma_t, and the mean is alpha_s x0 + sqrt(sigma_s^2 - c^2) eps_hat.
    """
    from core.kernels import posterior as k

    fused = _fused((z_t, x0, noise), (alpha_t, sigma_t, alpha_s, sigma_s))
    if fused is None:
        return k.posterior_sample_reference(z_t, x0, alpha_t, sigma_t, alpha_s, sigma_s, noise, eta)
    return k.POSTERIOR_SAMPLE(z_t, x0, *fused, noise, float(eta))


def weighted_loss(pred: Tensor, target: Tensor, weight=None, kind: str = "l2") -> Tensor:
    """mean_b w_b * mean_{non-batch} loss(pred - target), with kind 'l2' (squared) or 'l1'."""
    from core.kernels import weighted_loss as k

    fused = _fused((pred, target), (weight,))
    if fused is None:
        return k.weighted_loss_reference(pred, target, weight, kind)
    return k.WEIGHTED_LOSS(pred, target, *fused, kind)


def mm_generator_loss(x_tilde: Tensor, aux_x0: Tensor, teacher_x0: Tensor, weight=None) -> Tensor:
    """Moment matching's generator surrogate (Salimans et al. 2024, Alg. 2): mean_b w_b <x~_b, sg(aux_b - teacher_b)> / D.

    Its gradient w.r.t. x~ is w_b (aux - teacher) / (B * D): descent moves x~ toward the teacher's moment
    and away from the auxiliary's. D is the number of elements per sample.
    """
    from core.kernels import mm_loss as k

    fused = _fused((x_tilde, aux_x0, teacher_x0), (weight,))
    if fused is None:
        return k.mm_generator_loss_reference(x_tilde, aux_x0, teacher_x0, weight)
    return k.MM_GENERATOR_LOSS(x_tilde, aux_x0.detach(), teacher_x0.detach(), *fused)


def _fused(tensors: tuple[Tensor | None, ...], factors: tuple = ()) -> list[Tensor | None] | None:
    """None when the torch reference takes this call; else the per-sample factors as the kernels read them
    (``dispatch.factors``: contiguous 1-D tensors, None kept), for the op's ``KernelOp``."""
    if not dispatch.use_triton(tensors, tuple(f for f in factors if f is not None)):
        return None
    return dispatch.factors(next(t for t in tensors if t is not None), factors)
