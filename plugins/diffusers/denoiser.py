"""A diffusers UNet / SD3 transformer in the framework's convention ``denoise(x_t, t, cond) -> x0``.

t is in the schedule's units: the (fractional) diffusers timestep on ``vp-discrete`` (SD1.5, SDXL), the
flow time in [0, 1] on ``flow`` (SD3, where the network sees t * num_train_timesteps, as the SD3
pipeline feeds it sigma * 1000). The raw output (eps, v or flow velocity, from the scheduler's
``prediction_type``) becomes x0 in float32 via ``core.parameterization`` (DMD2 note sec. 2):
    eps:  x0 = (x_t - sigma eps) / alpha      v:  x0 = alpha x_t - sigma v      flow:  x0 = x_t - t v
The same module is the frozen teacher network and, as a trainable copy, the student and the critic.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from core import ops
from core.parameterization import to_x0
from core.schedules import NoiseSchedule


class DiffusersDenoiser(nn.Module):
    def __init__(self, net: nn.Module, family: str, schedule: NoiseSchedule, prediction: str, bank,
                 resolution, time_scale: float = 1.0, vae_scale: int = 8):
        super().__init__()
        self.net, self.family, self.schedule, self.prediction = net, family, schedule, prediction
        self.resolution = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        self.bank, self.time_scale, self.vae_scale = bank, time_scale, vae_scale
        # the GAN head reads bottleneck features through a forward hook on this submodule (DMD2 sec. 6)
        if family == "sd3":
            self.gan_tap = nn.Identity()  # transformer tokens reshaped to [B, C, h, w] pass through here
            mid = net.transformer_blocks[len(net.transformer_blocks) // 2]
            mid.register_forward_hook(self._tap_tokens)
            self.gan_feature_module = "gan_tap"
        else:
            self.gan_feature_module = "net.mid_block"

    def _tap_tokens(self, module, args, output):
        tokens = output[-1] if isinstance(output, tuple) else output
        p = self.net.config.patch_size
        h = self.__dict__.get("_latent_hw", (int(tokens.shape[1] ** 0.5) * p,))[0] // p
        self.gan_tap(tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, -1))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def forward(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        return self.denoise(x_t, t, cond)

    def raw(self, x_t: Tensor, t: Tensor, emb: dict[str, Tensor]) -> Tensor:
        """The network's own output (eps / v / velocity) for embeddings ``emb`` from the prompt bank."""
        dtype = self.dtype
        x = x_t.to(dtype)
        steps = (t.to(torch.float32) * self.time_scale)
        self._latent_hw = x.shape[-2:]
        if self.family == "sd3":
            return self.net(hidden_states=x, timestep=steps, encoder_hidden_states=emb["text"],
                            pooled_projections=emb["pooled"], return_dict=False)[0]
        extra = {}
        if self.family == "sdxl":
            extra["added_cond_kwargs"] = {"text_embeds": emb["pooled"], "time_ids": self.time_ids(x)}
        return self.net(x, steps, encoder_hidden_states=emb["text"], return_dict=False, **extra)[0]

    def time_ids(self, x: Tensor) -> Tensor:
        """SDXL micro-conditioning from the real image size (H, W) = latent size x VAE factor, as the SDXL
        pipeline builds it for a generated image: (original H, W; crop top, left = 0, 0; target H, W)."""
        h, w = (int(v) * self.vae_scale for v in x.shape[-2:])
        ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=x.dtype, device=x.device)
        return ids.expand(x.shape[0], -1)

    def embed(self, cond, batch: int, device) -> dict[str, Tensor]:
        return self.bank.lookup(cond, batch, device, self.dtype)

    def times(self, t, x_t: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device)
        return t.expand(x_t.shape[0]) if t.ndim == 0 else t

    def to_x0(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        t64 = t.to(torch.float64)
        x = x_t.float()
        return to_x0(out.float(), x, self.schedule.alpha(t64).float(), self.schedule.sigma(t64).float(),
                     self.prediction)

    def guided(self, x_t: Tensor, t: Tensor, cond=None, guidance: float | None = None) -> Tensor:
        """x0 with classifier-free guidance on the raw outputs (cond and uncond in one batch); None or 1: off."""
        t = self.times(t, x_t)
        b = x_t.shape[0]
        if guidance is None or guidance == 1:
            return self.to_x0(self.raw(x_t, t, self.embed(cond, b, x_t.device)), x_t, t)
        emb_c, emb_u = self.embed(cond, b, x_t.device), self.embed(None, b, x_t.device)
        emb = {k: torch.cat([emb_c[k], emb_u[k]]) for k in emb_c}
        out_c, out_u = self.raw(torch.cat([x_t, x_t]), torch.cat([t, t]), emb).float().chunk(2)
        t64 = t.to(torch.float64)
        return ops.guided_x0(out_c, out_u, x_t.float(), self.schedule.alpha(t64).float(),
                             self.schedule.sigma(t64).float(), guidance, self.prediction)

    def denoise(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        t = self.times(t, x_t)
        out = self.raw(x_t, t, self.embed(cond, x_t.shape[0], x_t.device))
        return self.to_x0(out, x_t, t).to(torch.promote_types(x_t.dtype, torch.float32))
