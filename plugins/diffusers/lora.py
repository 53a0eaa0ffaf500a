"""LoRA students and critics via peft (DMD2 note sec. 1: r=64, alpha=8 on attention, FF, conv and
time-embedding projections), plus merging a trained adapter back into plain weights for export."""

from __future__ import annotations

import copy

import attrs
import torch

from core.config import non_negative, positive
from plugins.diffusers._require import require

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
