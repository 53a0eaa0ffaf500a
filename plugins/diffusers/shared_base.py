"""One frozen UNet as teacher, student and fake-score critic: two peft LoRA adapters on a shared bf16 base.

DMD2 trains a generator and a fake-score critic that both start from the teacher (Yin et al. 2024). With
LoRA on both, the three networks differ only in their adapters, so one base in bf16 serves all three: the
teacher is the base with adapters disabled, the student and the critic are the base with the adapter of
that name active. Memory drops from three UNets (two of them fp32 with AdamW state) to one bf16 UNet plus
two small adapters. Usage::

    shared = SharedBase(unet, rank=64, alpha=8)            # unet: a diffusers UNet2DConditionModel
    x0 = shared("student", x_t, t, encoder_hidden_states=...).sample
    with torch.no_grad():
        real = shared("teacher", x_t2, t2, ...).sample     # bit-identical to the plain UNet
        fake = shared("critic", x_t2, t2, ...).sample
    opt_student = torch.optim.AdamW(shared.adapter_parameters("student"))

Each call activates its role for that forward only and then restores the *home* role (``shared.use(role)``,
default "student"). Set the home role to the network a phase trains before its backward: with gradient
checkpointing the backward re-runs the forward, and it must see the same adapter the forward saw.
peft's switch also sets ``requires_grad``: only the active adapter's parameters take gradients (none for
the teacher), so in each phase gradients reach only the adapter being trained.

Under autocast, peft's cast of each adapted layer's input to the fp32 adapter dtype is switched off: the
adapter matmuls run in the autocast dtype anyway, so the cast and autocast's cast back change nothing but
cost two launches per adapted layer (788 in SDXL's UNet) in every forward and backward. Without autocast
the cast stays on (a bf16 input cannot meet an fp32 adapter weight).
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from plugins.diffusers._require import require
from plugins.diffusers.lora import TARGETS

ROLES = ("teacher", "student", "critic")
ADAPTERS = ("student", "critic")


class SharedBase(torch.nn.Module):
    """Teacher, student and critic over one frozen base ``unet`` (modified in place: adapters injected).

    rank, alpha: the LoRA rank and alpha of both adapters (DMD2: 64 and 8); targets: module-name suffixes
    (default: DMD2's set, ``lora.TARGETS["unet"]``); base_dtype: the frozen base's dtype (bf16);
    adapter_dtype: the adapters' (fp32, as their optimizer wants). Both adapters start with B = 0, so the
    student and the critic equal the teacher at initialisation, as DMD2 initialises them.
    """

    def __init__(self, unet: torch.nn.Module, *, rank: int = 64, alpha: float = 8.0, targets=None,
                 base_dtype: torch.dtype = torch.bfloat16, adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        peft = require("peft")
        present = [name for name, _ in unet.named_modules()]
        targets = [t for t in (targets or TARGETS["unet"]) if any(n == t or n.endswith("." + t) for n in present)]
        unet.requires_grad_(False).to(base_dtype)
        for name in ADAPTERS:
            config = peft.LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
            with warnings.catch_warnings():  # a second adapter is the point here, not a mistake
                warnings.filterwarnings("ignore", message=".*multiple adapters.*")
                unet.add_adapter(config, adapter_name=name)
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(adapter_dtype)
        self.unet = unet
        self._adapted = [m for m in unet.modules() if hasattr(m, "cast_input_dtype_enabled")]  # peft LoRA layers
        self._input_cast = True
        self.home = "student"
        self._activate(self.home)

    def _activate(self, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role '{role}'; choose one of {ROLES}")
        if role == "teacher":
            self.unet.disable_adapters()
        else:
            self.unet.enable_adapters()
            self.unet.set_adapter(role)

    def use(self, role: str) -> None:
        """Make ``role`` the home role: active between calls, and during the backward of a checkpointed forward."""
        self._activate(role)
        self.home = role

    @contextlib.contextmanager
    def active(self, role: str):
        """Run a block with ``role`` active (e.g. several forwards), then restore the home role."""
        self._activate(role)
        try:
            yield self.unet
        finally:
            self._activate(self.home)

    def forward(self, role: str, *args, **kwargs):
        """The UNet's forward as ``role`` ("teacher", "student" or "critic"); the home role is restored after."""
        self._cast_adapter_inputs(not torch.is_autocast_enabled(self.unet.device.type))
        with self.active(role) as unet:
            return unet(*args, **kwargs)

    def _cast_adapter_inputs(self, enabled: bool) -> None:
        if enabled != self._input_cast:
            for layer in self._adapted:
                layer.cast_input_dtype_enabled = enabled
            self._input_cast = enabled

    def adapter_parameters(self, role: str) -> list[torch.nn.Parameter]:
        """The adapter parameters of ``role`` (what its optimizer trains)."""
        if role not in ADAPTERS:
            raise ValueError(f"only {ADAPTERS} have trainable parameters, not '{role}'")
        return [p for name, p in self.unet.named_parameters() if "lora_" in name and f".{role}." in name]
