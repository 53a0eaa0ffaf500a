"""Student and critic ``shared-lora``: DMD2's teacher, student and fake score as ONE frozen UNet with two peft
adapters (``python -m core.run objective=dmd2 teacher=sdxl student=shared-lora critic=shared-lora``).

DMD2 trains a generator and a fake-score critic that both start from the teacher (Yin et al. 2024). With LoRA on
both, the three networks differ only in their adapters, so one base serves all three: the teacher is the base
with adapters disabled, the student and the critic are the base with the adapter of that name active. Memory
drops from three UNets (two of them fp32 with AdamW state) to one frozen UNet in the teacher's dtype (bf16 on
CUDA) plus two small adapters (docs/memory.md).

``SharedBase`` owns the UNet; ``SharedRole`` is one role of it as a fewstep denoiser (what the runner sees as the
student, the critic and the teacher's network). A role's parameters, state dict and optimizer are its adapter's
only, so checkpoints hold the adapters and never the base.
"""

from __future__ import annotations

import contextlib
import warnings

import attrs
import torch
from torch import nn

from core.config import positive
from core.errors import UsageError
from plugins.diffusers.loading import require
from plugins.diffusers.networks import TARGETS, DiffusersDenoiser, NetConfig, add_lora

ROLES = ("teacher", "student", "critic")
ADAPTERS = ("student", "critic")


class SharedBase(torch.nn.Module):
    """Teacher, student and fake-score critic over one frozen base ``unet`` (modified in place: two peft LoRA
    adapters injected into it, the base cast to ``base_dtype``). Usage::

        shared = SharedBase(unet, rank=64, alpha=8)            # unet: a diffusers UNet2DConditionModel
        x0 = shared("student", x_t, t, encoder_hidden_states=...).sample
        with torch.no_grad():
            real = shared("teacher", x_t2, t2, ...).sample     # bit-identical to the plain UNet
            fake = shared("critic", x_t2, t2, ...).sample
        opt_student = torch.optim.AdamW(shared.adapter_parameters("student"))

    Each call activates its role for that forward only and then restores the *home* role (``shared.use(role)``,
    default "student"). peft's switch also sets ``requires_grad``: only the active adapter's parameters take
    gradients (none for the teacher). A plain ``shared(role, ...)`` call leaves that switch in place, so set the
    home role to the network a phase trains before its backward. ``role_call`` (used by ``SharedRole``, the run
    option) instead puts every adapter's ``requires_grad`` back after the call, so whoever trains the adapters
    decides; and ``checkpoint`` (given to diffusers' gradient checkpointing) re-runs a block in the backward with
    the role its forward ran, whatever is active by then.

    Under autocast, peft's cast of each adapted layer's input to the fp32 adapter dtype is switched off: the
    adapter matmuls run in the autocast dtype anyway, so the cast and autocast's cast back change nothing but
    cost two launches per adapted layer (788 in SDXL's UNet) in every forward and backward. Without autocast
    the cast stays on (a bf16 input cannot meet an fp32 adapter weight).

    rank, alpha: the LoRA rank and alpha of both adapters (DMD2: 64 and 8); targets: module-name suffixes
    (default: DMD2's set, ``TARGETS["unet"]``); base_dtype: the frozen base's dtype (bf16);
    adapter_dtype: the adapters' (fp32, as their optimizer wants). Both adapters start with B = 0, so the
    student and the critic equal the teacher at initialisation, as DMD2 initialises them.
    """

    def __init__(self, unet: torch.nn.Module, *, rank: int = 64, alpha: float = 8.0, targets=None,
                 base_dtype: torch.dtype = torch.bfloat16, adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        peft = require("peft")
        present = [name for name, _ in unet.named_modules()]
        targets = [t for t in (targets or TARGETS["unet"]) if any(n == t or n.endswith("." + t) for n in present)]
        self.rank, self.alpha, self.targets = rank, alpha, targets
        unet.requires_grad_(False).to(base_dtype)
        devices = [d for d in {p.device for p in unet.parameters()} if d.type == "cuda"]
        for name in ADAPTERS:
            config = peft.LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
            with warnings.catch_warnings(), torch.random.fork_rng(devices=devices):
                warnings.filterwarnings("ignore", message=".*multiple adapters.*")  # a second adapter is the point
                unet.add_adapter(config, adapter_name=name)  # its random init leaves the caller's RNG alone
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(adapter_dtype)
        self.unet = unet
        self._adapted = [m for m in unet.modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)]
        # each adapter's modules (lora_A/lora_B of every layer), not its parameters: conversions such as the
        # planner's fake tensors replace Parameter objects but keep the modules
        self._adapter_modules = {name: [getattr(layer, attr)[name] for layer in self._adapted
                                for attr in layer.adapter_layer_names if name in getattr(layer, attr)]
                         for name in ADAPTERS}
        self._input_cast = True
        self.home, self.current = "student", None
        self._activate(self.home)

    def _activate(self, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role '{role}'; choose one of {ROLES}")
        if role == self.current:
            return
        # peft's enable_adapters/set_adapter through diffusers, done directly: their walk over every module (with
        # validation) on each of the iteration's role switches was a third of the shared mode's host time.
        # The same state results (tests/test_shared_base.py compares): the layers' flags, and requires_grad on the
        # active adapter only.
        for layer in self._adapted:
            layer._disable_adapters = role == "teacher"
            if role != "teacher":
                layer._active_adapter = [role]
        for name, modules in self._adapter_modules.items():
            for m in modules:
                m.requires_grad_(name == role)
        self.current = role

    def use(self, role: str) -> None:
        """Make ``role`` the home role: active between calls, and during the backward of a checkpointed forward."""
        self._activate(role)
        self.home = role

    @contextlib.contextmanager
    def active(self, role: str):
        """Run a block with ``role`` active (e.g. several forwards), then restore the home role."""
        previous = self.current
        self._activate(role)
        try:
            yield self.unet
        finally:
            self._activate(previous or self.home)

    @contextlib.contextmanager
    def role_call(self, role: str):
        """``active(role)`` that leaves every adapter parameter's ``requires_grad`` as it found it."""
        self._cast_adapter_inputs(not torch.is_autocast_enabled(self._device_type()))
        if role == self.current:  # no switch, so peft sets no flag: nothing to put back
            yield self.unet
            return
        params = [p for name in ADAPTERS for m in self._adapter_modules[name] for p in m.parameters()]
        flags = [p.requires_grad for p in params]
        try:
            with self.active(role) as unet:
                yield unet
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)

    def checkpoint(self, block, *args, **kwargs):
        """Gradient checkpointing of one block that re-runs it in the backward with the role of its forward
        (``unet.enable_gradient_checkpointing(gradient_checkpointing_func=shared.checkpoint)``)."""
        role = self.current

        def run(*a, **k):
            with self.role_call(role):  # free when the role is still active (a phase's own role)
                return block(*a, **k)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

    def forward(self, role: str, *args, **kwargs):
        """The UNet's forward as ``role`` ("teacher", "student" or "critic"); the home role is restored after."""
        self._cast_adapter_inputs(not torch.is_autocast_enabled(self._device_type()))
        with self.active(role) as unet:
            return unet(*args, **kwargs)

    def _device_type(self) -> str:
        return self._adapted[0].base_layer.weight.device.type  # unet.device walks every module

    def _cast_adapter_inputs(self, enabled: bool) -> None:
        if enabled != self._input_cast:
            for layer in self._adapted:
                layer.cast_input_dtype_enabled = enabled
            self._input_cast = enabled

    def adapter_named_parameters(self, role: str) -> list[tuple[str, torch.nn.Parameter]]:
        if role not in ADAPTERS:
            raise ValueError(f"only {ADAPTERS} have trainable parameters, not '{role}'")
        return [(name, p) for name, p in self.unet.named_parameters() if "lora_" in name and f".{role}." in name]

    def adapter_parameters(self, role: str) -> list[torch.nn.Parameter]:
        """The adapter parameters of ``role`` (what its optimizer trains)."""
        return [p for _, p in self.adapter_named_parameters(role)]


# -- the run option -----------------------------------------------------------------------------------------

class SharedRole(DiffusersDenoiser):
    """One role of a ``SharedBase`` as a fewstep denoiser. The UNet is deliberately not a registered submodule:
    ``parameters()``, ``state_dict()`` and ``.to()`` see this role's adapter only (the same tensors the UNet
    uses, under names with "/" for "."). The GAN head reads the UNet's mid block through ``gan_tap``, which only
    this role's forwards pass through."""

    def __init__(self, shared: SharedBase, role: str, like: DiffusersDenoiser):
        nn.Module.__init__(self)
        self.__dict__.update(net=shared.unet, shared=shared)  # unregistered on purpose (see the class doc)
        self.role, self.family, self.schedule, self.prediction = role, like.family, like.schedule, like.prediction
        self.resolution, self.bank, self.time_scale, self.vae_scale = (like.resolution, like.bank, like.time_scale,
                                                                      like.vae_scale)
        if role != "teacher":
            params = shared.adapter_named_parameters(role)
            self.adapter = nn.ParameterDict({name.replace(".", "/"): p for name, p in params})
            for _, p in params:
                p.requires_grad_(True)  # the runner's phases decide from here on (SharedBase.role_call)
        self.gan_tap = nn.Identity()
        self.gan_feature_module = "gan_tap"
        shared.unet.mid_block.register_forward_hook(self._tap_mid_block)

    def _tap_mid_block(self, module, args, output):
        if self.shared.current == self.role:
            self.gan_tap(output)

    def raw(self, *args, **kwargs):
        with self.shared.role_call(self.role):
            return super().raw(*args, **kwargs)

    def __deepcopy__(self, memo):
        if self.role == "teacher":  # e.g. critic=fake-score's trainable copy: the plain base, adapters left out
            return self._plain(self.dtype, self.net.device)
        raise UsageError(f"{self.role}=shared-lora keeps no EMA or other copy of its adapter; set train.ema=0")

    def _plain(self, dtype, device) -> DiffusersDenoiser:
        """The base network alone (no adapters) as a new UNet in ``dtype``."""
        unet = self.net
        plain = type(unet).from_config(unet.config)
        plain.load_state_dict({k.replace(".base_layer.", "."): v.detach() for k, v in unet.state_dict().items()
                               if "lora_" not in k})
        return DiffusersDenoiser(plain.to(device, dtype), self.family, self.schedule, self.prediction, self.bank,
                                 self.resolution, self.time_scale, self.vae_scale)

    def standalone(self) -> DiffusersDenoiser:
        """A plain float32 CPU copy of the UNet with this role's adapter as peft's "default" one (what export,
        merged UNet and LoRA file alike, expects of a LoRA student)."""
        if self.role == "teacher":
            raise ValueError("the teacher role has no adapter to export")
        out, s = self._plain(torch.float32, "cpu"), self.shared
        add_lora(out, NetConfig(lora_rank=s.rank, lora_alpha=s.alpha, lora_targets=s.targets))
        adapter = {k.replace(f".{self.role}.", ".default."): v.detach().float().cpu()
                   for k, v in s.adapter_named_parameters(self.role)}
        missing, unexpected = out.net.load_state_dict(adapter, strict=False)
        if unexpected or any("lora_" in k for k in missing):
            raise RuntimeError(f"adapter keys do not match: unexpected {unexpected[:3]}")
        return out.eval()


@attrs.define(kw_only=True)
class SharedLoraConfig:
    """Options of ``shared-lora`` (the same for the student and the critic: they share one base)."""

    lora_rank: int = attrs.field(default=64, validator=positive, metadata={"doc": "LoRA rank of both adapters"})
    lora_alpha: float = attrs.field(default=8.0, validator=positive, metadata={"doc": "LoRA alpha (scale alpha/rank)"})


def shared_base_of(teacher, config: SharedLoraConfig, role: str) -> SharedBase:
    """The teacher's shared base, built on first use: the teacher's own network gets the two adapters (its
    weights stay as loaded, so the teacher role is bit-identical) and the teacher denoises through its role."""
    from plugins.diffusers.teacher import DiffusersTeacher

    if not isinstance(teacher, DiffusersTeacher) or teacher.family == "sd3":
        raise UsageError(f"{role}=shared-lora needs a UNet diffusers teacher (sdxl, sd15); got "
                         f"{getattr(teacher, 'family', type(teacher).__name__)}. Use {role}=diffusers with "
                         f"{role}.lora_rank=64 instead")
    if teacher.config.offload:
        raise UsageError(f"{role}=shared-lora trains adapters on the teacher's own UNet, which cannot leave the "
                         "device between forwards: drop teacher.offload=true")
    shared = getattr(teacher, "shared_base", None)
    if shared is None:
        shared = SharedBase(teacher.denoiser.net, rank=config.lora_rank, alpha=config.lora_alpha,
                            base_dtype=teacher.weight_dtype)
        if teacher.config.gradient_checkpointing:
            shared.unet.enable_gradient_checkpointing(gradient_checkpointing_func=shared.checkpoint)
        teacher.shared_base = shared
        teacher.denoiser = SharedRole(shared, "teacher", teacher.denoiser)
    elif (shared.rank, shared.alpha) != (config.lora_rank, config.lora_alpha):
        raise UsageError(f"student and critic share one base: give both the same lora_rank and lora_alpha "
                         f"(student: {shared.rank}/{shared.alpha:g}, critic: {config.lora_rank}/{config.lora_alpha:g})")
    return shared


def shared_student(config: SharedLoraConfig, teacher, device="cpu"):
    """The student as a LoRA adapter on the teacher's own (frozen) network; use with critic=shared-lora."""
    return SharedRole(shared_base_of(teacher, config, "student"), "student", teacher.denoiser).to(device)


def shared_critic(config: SharedLoraConfig, teacher, student, device="cpu"):
    """DMD2's fake score as a second LoRA adapter on the teacher's network (needs student=shared-lora)."""
    if not isinstance(student, SharedRole):
        raise UsageError("critic=shared-lora shares the student's base: use student=shared-lora too")
    critic = SharedRole(shared_base_of(teacher, config, "critic"), "critic", teacher.denoiser).to(device)
    teacher.gan_feature_module = critic.gan_feature_module  # where DMD2's GAN head reads this critic
    return critic

