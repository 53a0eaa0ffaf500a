"""DMD2's GAN term: a small discriminator head on the critic's bottleneck features (Yin et al. 2024, sec. 4.3;
method note sec. 6).

The critic (fake score) doubles as the discriminator's trunk. Its features are read by a forward hook on one
named module (the teacher plugin names it, e.g. a UNet's ``mid_block``); the forward stops at that module,
so the decoder half never runs and no forward is ever copied. The head is sized from the feature shape.

Losses are the non-saturating ones, written with softplus and averaged over the batch:
    L_Gadv = E[softplus(-h(x_fake))],   L_Dadv = E[softplus(h(x_fake))] + E[softplus(-h(x_real))].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from core.errors import UsageError


class _Stop(Exception):
    """Raised by the feature hook to end the critic's forward once the bottleneck has run."""


def find_module(root: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` (dotted, as in ``named_modules``) of ``root``, or a UsageError listing options."""
    modules = dict(root.named_modules())
    if name not in modules:
        options = [n for n in modules if n][:12]
        raise UsageError(f"GAN feature module '{name}' is not in the critic ({type(root).__name__}); "
                         f"choose one of its modules, e.g. {', '.join(options)} (objective.gan_feature_module=NAME)")
    return modules[name]


def critic_features(critic: nn.Module, module: nn.Module, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
    """The output of ``module`` when the critic denoises x_t at t; the rest of the forward is skipped."""
    store: dict = {}

    def hook(mod, args, out):
        store["features"] = out[0] if isinstance(out, (tuple, list)) else out
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        critic.denoise(x_t, t, cond)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "features" not in store:
        raise UsageError(f"GAN feature module {type(module).__name__} did not run in the critic's forward; "
                         "name a module on the denoising path (objective.gan_feature_module=NAME)")
    return store["features"]


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


class GANHead(nn.Module):
    """h: bottleneck features -> one logit per sample, sized from the feature shape (without the batch dim).

    - [C]: MLP C -> C -> 1 (vector features, e.g. an MLP critic's trunk).
    - [N, C]: mean over tokens, then the MLP (transformer critics).
    - [C, H, W]: DMD2's conv head: [4x4 conv stride 2, GroupNorm, SiLU] blocks while the map is larger than 4,
      then one conv over the whole remaining map (DMD2's 4x4 stride-4 conv at 4x4), GroupNorm, SiLU and a
      1x1 conv to the logit. 32x32 gives DMD2's SDXL head, 8x8 its SD1.5 / ImageNet-64 head. Maps of another
      size (aspect-ratio buckets) are average-pooled to that last conv's window after the strided blocks, which
      changes nothing at the size the head was built for.
    """

    def __init__(self, feature_shape: tuple[int, ...]):
        super().__init__()
        self.feature_shape = tuple(int(s) for s in feature_shape)
        shape = self.feature_shape
        if len(shape) in (1, 2):
            c = shape[-1]
            self.net = nn.Sequential(nn.Linear(c, c), nn.SiLU(), nn.Linear(c, 1))
        elif len(shape) == 3:
            c, h, w = shape
            layers: list[nn.Module] = []
            while min(h, w) > 4:
                layers += [nn.Conv2d(c, c, 4, stride=2, padding=1), nn.GroupNorm(_groups(c), c), nn.SiLU()]
                h, w = h // 2, w // 2
            self.window, self.strided = (h, w), len(layers)
            layers += [nn.Conv2d(c, c, (h, w)), nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv2d(c, 1, 1)]
            self.net = nn.Sequential(*layers)
        else:
            raise UsageError(f"GAN head: cannot size a head for features of shape {shape}; "
                             "name a module with [C], [tokens, C] or [C, H, W] outputs")

    def forward(self, features: Tensor) -> Tensor:
        f = features.float()  # the reference reads the bottleneck in fp32
        if f.ndim == 3:
            f = f.mean(1)
        if f.ndim == 4:
            f = self.net[:self.strided](f)
            if f.shape[-2:] != self.window:
                f = F.adaptive_avg_pool2d(f, self.window)
            return self.net[self.strided:](f).flatten(1).mean(1)
        return self.net(f).flatten(1).mean(1)


def generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss E[softplus(-h(x_fake))] = E[-log sigmoid(h)]."""
    return F.softplus(-logits_fake).mean()


def discriminator_loss(logits_fake: Tensor, logits_real: Tensor) -> Tensor:
    """E[softplus(h(x_fake))] + E[softplus(-h(x_real))]: fake pushed to 0, real to 1."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()
