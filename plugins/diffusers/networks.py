"""The networks: a diffusers UNet / SD3 transformer as a fewstep denoiser (the frozen teacher network and, as
trainable copies, the student and the critic), and LoRA adapters on it (``SharedBase``, one frozen UNet as
teacher, student and critic through two adapters, is in plugins.diffusers.shared).

``DiffusersDenoiser`` follows the framework's convention ``denoise(x_t, t, cond) -> x0``. t is in the schedule's
units: the (fractional) diffusers timestep on ``vp-discrete`` (SD1.5, SDXL), the flow time in [0, 1] on ``flow``
(SD3, where the network sees t * num_train_timesteps, as the SD3 pipeline feeds it sigma * 1000). The raw output
(eps, v or flow velocity, from the scheduler's ``prediction_type``) becomes x0 in float32 via
``core.parameterization`` (DMD2 note sec. 2):
    eps:  x0 = (x_t - sigma eps) / alpha      v:  x0 = alpha x_t - sigma v      flow:  x0 = x_t - t v
"""

from __future__ import annotations

import copy

import attrs
import torch
from torch import Tensor, nn

from core import ops
from core.config import non_negative, positive
from core.parameterization import to_x0
from core.registry import warn
from core.schedules import NoiseSchedule
from plugins.diffusers.loading import require

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

    def forward(self, x_t: Tensor, t: Tensor, cond=None, extra_emb: Tensor | None = None) -> Tensor:
        return self.denoise(x_t, t, cond, extra_emb)

    # -- SFD-v's step-count conditioning (plugins/sfd.py, student=copy-nfe) -------------------------------------
    # NFEConditioned adds its NFE embedding ``extra_emb`` [B, emb_width] to the network's time embedding, the
    # vector every ResNet block (UNet) or AdaLayerNorm (SD3) reads. It enters after the time embedding's last
    # linear layer, so for one fixed NFE it is a constant shift of that layer's bias: ``fold_time_shift`` writes
    # it there, and the exported network is a plain diffusers model that needs no extra input.
    @property
    def backbone(self) -> DiffusersDenoiser:
        """The network that takes ``extra_emb``: this wrapper (NFEConditioned looks for ``backbone``)."""
        return self

    @property
    def time_embedding(self) -> nn.Module:
        """The module whose output is the time embedding: TimestepEmbedding (UNet), the SD3 transformer's
        timestep MLP (its output is summed with the pooled-text MLP's into the block conditioning)."""
        return self.net.time_text_embed.timestep_embedder if self.family == "sd3" else self.net.time_embedding

    @property
    def emb_width(self) -> int:
        return self.time_embedding.linear_2.out_features

    def raw(self, x_t: Tensor, t: Tensor, emb: dict[str, Tensor], extra_emb: Tensor | None = None) -> Tensor:
        """The network's own output (eps / v / velocity) for embeddings ``emb`` from the prompt bank, with
        ``extra_emb`` added to the time embedding for this call."""
        if extra_emb is None:
            return self._raw(x_t, t, emb)
        handle = self.time_embedding.register_forward_hook(lambda mod, args, out: out + extra_emb.to(out.dtype))
        try:
            return self._raw(x_t, t, emb)
        finally:
            handle.remove()

    def _raw(self, x_t: Tensor, t: Tensor, emb: dict[str, Tensor]) -> Tensor:
        dtype = self.dtype
        x = x_t.to(dtype)
        steps = (t.to(torch.float32) * self.time_scale)
        self._latent_hw = x.shape[-2:]
        if self.family == "sd3":
            return self.net(hidden_states=x, timestep=steps, encoder_hidden_states=emb["text"],
                            pooled_projections=emb["pooled"], return_dict=False)[0]
        extra = {}
        if self.family == "sdxl":
            extra["added_cond_kwargs"] = {"text_embeds": emb["pooled"], "time_ids": self.time_ids(x, emb.get("size"))}
        return self.net(x, steps, encoder_hidden_states=emb["text"], return_dict=False, **extra)[0]

    def time_ids(self, x: Tensor, size: Tensor | None = None) -> Tensor:
        """SDXL's micro-conditioning (original H, W; crop top, left; target H, W) with the target size (H, W) =
        latent size x VAE factor. ``size`` [B, 4] holds each real image's (original H, W, crop top, left)
        (``PromptBank.lookup``); its NaN rows, and every row without it, are generated images, conditioned
        as the SDXL pipeline conditions them by default: (H, W, 0, 0, H, W)."""
        h, w = (int(v) * self.vae_scale for v in x.shape[-2:])
        ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=x.device).repeat(x.shape[0], 1)
        if size is not None:
            real = ~size[:, 0].isnan()
            ids[real, :4] = size[real].to(ids)
        return ids.to(x.dtype)

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
        if "size" in emb_c:  # the pipelines pair the unconditional half with the same time ids
            emb_u["size"] = emb_c["size"]
        emb = {k: torch.cat([emb_c[k], emb_u[k]]) for k in emb_c}
        out_c, out_u = self.raw(torch.cat([x_t, x_t]), torch.cat([t, t]), emb).float().chunk(2)
        t64 = t.to(torch.float64)
        return ops.guided_x0(out_c, out_u, x_t.float(), self.schedule.alpha(t64).float(),
                             self.schedule.sigma(t64).float(), guidance, self.prediction)

    def denoise(self, x_t: Tensor, t: Tensor, cond=None, extra_emb: Tensor | None = None) -> Tensor:
        t = self.times(t, x_t)
        out = self.raw(x_t, t, self.embed(cond, x_t.shape[0], x_t.device), extra_emb)
        return self.to_x0(out, x_t, t).to(torch.promote_types(x_t.dtype, torch.float32))


def fold_time_shift(net: nn.Module, family: str, shift: Tensor) -> None:
    """Add the constant ``shift`` [emb_width] to the time embedding of a plain diffusers ``net`` for good (its
    last linear layer's bias), which equals ``DiffusersDenoiser.raw(..., extra_emb=shift)`` on every input."""
    module = net.time_text_embed.timestep_embedder if family == "sd3" else net.time_embedding
    if getattr(module, "post_act", None) is not None:
        raise ValueError("the time embedding has an activation after its last layer; a shift cannot be folded")
    with torch.no_grad():
        module.linear_2.bias.add_(shift.to(module.linear_2.bias))


# -- LoRA -------------------------------------------------------------------------------------------
# LoRA students and critics via peft (DMD2 note sec. 1: r=64, alpha=8 on attention, FF, conv and
# time-embedding projections), plus merging a trained adapter back into plain weights for export.

# module-name suffixes (peft matches on them); the UNet list is DMD2's, the SD3 one covers the same roles
TARGETS = {
    "unet": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
             "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"],
    "transformer": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
}


@attrs.define(kw_only=True)
class NetConfig:
    """Options of a trainable diffusers network (student or critic)."""

    lora_rank: int = attrs.field(default=0, validator=non_negative,
                                 metadata={"doc": "LoRA rank via peft (0: full fine-tune)"})
    lora_alpha: float = attrs.field(default=8.0, validator=positive, metadata={"doc": "LoRA alpha (scale alpha/rank)"})
    lora_dropout: float = attrs.field(default=0.0, validator=non_negative)
    lora_targets: list[str] | None = attrs.field(default=None,
                                                 metadata={"doc": "module-name suffixes (default: DMD2's set)"})


def add_lora(denoiser, config: NetConfig):
    """Freeze the network and attach a trainable LoRA adapter (the only parameters left trainable)."""
    peft = require("peft")
    net = denoiser.net
    kind = "transformer" if denoiser.family == "sd3" else "unet"
    targets = config.lora_targets or TARGETS[kind]
    present = [name for name, _ in net.named_modules()]
    targets = [t for t in targets if any(n == t or n.endswith("." + t) for n in present)]
    lora = peft.LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                           init_lora_weights="gaussian", target_modules=targets)
    net.requires_grad_(False)
    # peft's random init must not consume the caller's RNG: `core.sample seed=S` draws the same noise for a
    # LoRA student as the exported pipeline does for `torch.manual_seed(S)`
    devices = [d for d in {p.device for p in net.parameters()} if d.type == "cuda"]
    with torch.random.fork_rng(devices=devices):
        net.add_adapter(lora)  # diffusers' PeftAdapterMixin: injects layers in place, names unchanged
    for name, p in net.named_parameters():
        p.requires_grad_("lora_" in name)
    denoiser.lora_config = lora
    return denoiser


def has_lora(net: torch.nn.Module) -> bool:
    return any("lora_" in name for name, _ in net.named_parameters())


def merged_copy(net: torch.nn.Module) -> torch.nn.Module:
    """A plain (adapter-free) network of the same class whose weights are base + scale * B A."""
    from peft.tuners.lora import LoraLayer

    work = copy.deepcopy(net).float().cpu()
    for module in work.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    state = {}
    for k, v in work.state_dict().items():
        if "lora_" in k:
            continue
        state[k.replace(".base_layer.", ".")] = v
    plain = type(net).from_config(net.config)
    plain.load_state_dict(state)
    return plain


def lora_state_dict(net: torch.nn.Module) -> dict:
    peft = require("peft")
    return peft.get_peft_model_state_dict(net)


def set_attention(net, backend: str, quiet: bool = False) -> None:
    """SDPA (diffusers' default processor) or xformers; xformers falls back to SDPA with a message."""
    if backend != "xformers":
        return
    reason = None
    if not torch.cuda.is_available():
        reason = "it needs CUDA"
    else:
        try:
            import xformers  # noqa: F401
        except ImportError:
            reason = "the xformers package is not installed"
    if reason is None:
        net.enable_xformers_memory_efficient_attention()
    elif not quiet:
        warn(f"teacher.attention=xformers: {reason}; using PyTorch SDPA attention instead")
