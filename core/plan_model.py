"""The memory model behind ``python -m core.run plan`` (core.plan): a run's networks built from configs on fake
tensors (core.plan_nets; no weights read), counted per role, and one iteration of each phase run on them.

Per role: parameter bytes by dtype, gradient bytes, optimizer-state bytes (AdamW: two states in the parameter's
dtype and a step per tensor; 8-bit AdamW: two 1-byte states and a float32 absmax per 256 values). Activations
are counted, not guessed: each phase (its trained networks' forward with grad, for the generator the guided
teacher and critic forwards without, then the backward) runs on fake tensors while core.memsim counts the
bytes alive, gradients included. The peak is the resident bytes (weights, optimizer states) plus the largest
phase. The target is a CUDA GPU with bf16 autocast: CPU autocast is used, with CUDA's float32 norms.
"""

from __future__ import annotations

import contextlib
import math

import attrs
import torch
from torch import nn

from core import memsim, plan_nets
from core.registry import get_registry
from core.runconfig import RunConfig

GiB = 2**30
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@attrs.define(frozen=True)
class Setting:
    """One memory configuration of a run (what the levers change)."""

    batch: int                                  # micro-batch per optimizer step
    latent: tuple[int, int] | None = None       # latent (H, W) (diffusers; None: the model's native size)
    autocast: bool = True                       # bf16 autocast (CUDA's op lists)
    teacher_dtype: torch.dtype = torch.bfloat16  # frozen teacher, text encoders and VAE
    student_lora: int = 0                       # LoRA rank of the student (0: full fine-tune)
    critic_lora: int = 0
    lora_alpha: float = 8.0
    lora_base_dtype: torch.dtype = torch.float32  # frozen base under a LoRA adapter
    checkpointing: bool = False                 # gradient checkpointing of the trained networks
    optimizer: str = "adamw"                    # adamw | adamw8bit
    ema: bool = False
    encoders_on_gpu: bool = True                # text encoders and VAE resident (no caches)
    teacher_on_gpu: bool = True                 # False: teacher offloaded to CPU between its forwards
    shared_base: bool = False                   # one frozen bf16 base + student and critic adapters
    cfg_passes: int = 1                         # teacher CFG: 1 batched call (fewstep), 2 passes (official DMD2)
    gan: bool = True


@attrs.define
class Role:
    name: str
    params: dict[str, int]     # bytes by dtype name
    numel: int
    trainable: int             # trainable parameter count
    grad: int                  # gradient bytes
    optim: int                 # optimizer-state bytes
    on_gpu: bool = True

    @property
    def resident(self) -> int:
        return (sum(self.params.values()) + self.optim) if self.on_gpu else 0


def optimizer_bytes(params: list[nn.Parameter], kind: str) -> int:
    """AdamW: exp_avg and exp_avg_sq in the parameter's dtype plus a float32 step per tensor. bitsandbytes'
    AdamW8bit: 1 byte per state and a float32 absmax per block of 256, for tensors of >= 4096 values
    (smaller ones keep 32-bit states)."""
    total = 0
    for p in params:
        n = p.numel()
        if kind == "adamw8bit" and n >= 4096:
            total += 2 * n + 2 * 4 * math.ceil(n / 256) + 4
        elif kind == "adamw8bit":
            total += 2 * 4 * n + 4
        else:
            total += 2 * n * p.element_size() + 4
    return total


def role(name: str, modules, optimizer: str, on_gpu: bool = True, only=None, adapter: bool = False) -> Role:
    """Bytes of ``modules``' parameters (those whose name passes ``only``, when given). ``adapter``: all of them
    train (a shared base's adapter, whose ``requires_grad`` follows the active role)."""
    params = [p for m in modules for n, p in m.named_parameters() if only is None or only(n)]
    by_dtype: dict[str, int] = {}
    for p in params:
        key = str(p.dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0) + p.numel() * p.element_size()
    train = [p for p in params if p.requires_grad or adapter]
    return Role(name, by_dtype, sum(p.numel() for p in params), sum(p.numel() for p in train),
                sum(p.numel() * p.element_size() for p in train), optimizer_bytes(train, optimizer), on_gpu)


def _float32_input(module, args):
    if torch.is_autocast_enabled("cpu"):
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


@contextlib.contextmanager
def float32_norms(modules, enabled: bool = True):
    """CUDA autocast runs group and layer norms in float32 (CPU autocast keeps them in bf16): their inputs are
    cast up, as CUDA's autocast does. Module hooks, so checkpointed forwards re-run in the backward alike."""
    norms = (nn.GroupNorm, nn.LayerNorm)
    handles = [m.register_forward_pre_hook(_float32_input) for net in (modules if enabled else [])
               for m in net.modules() if isinstance(m, norms)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@attrs.define
class Iteration:
    """How to call the run's networks on fake inputs: ``call(role, batch)`` -> output; which roles exist."""

    call: object
    has: set
    modules: list  # the networks (for CUDA's float32 norms)


def phase_peak(it: Iteration, trains: tuple[str, ...], s: Setting, guidance: bool, cuda_norms: bool = True) -> int:
    """Most bytes alive in one phase: trained networks' forward with grad, (for the generator) the teacher's
    guided forward and the critic's without grad, then the backward, gradients kept."""
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.autocast)
    with memsim.counting() as live, float32_norms(it.modules, cuda_norms):
        outs = []
        with bf16:
            for name in trains:
                if name in it.has and name != "gan_head":
                    outs.append(it.call(name, s.batch, True))
            if "student" in trains:
                with torch.no_grad():
                    if "teacher" in it.has:
                        for _ in range(s.cfg_passes):
                            it.call("teacher", s.batch * (2 if guidance and s.cfg_passes == 1 else 1), False)
                    if "critic" in it.has:
                        it.call("critic", s.batch, False)
        if outs:
            sum(o.float().square().mean() for o in outs).backward()
        del outs
    return live.peak


@attrs.define
class Plan:
    setting: Setting
    roles: list[Role]
    phases: dict[str, int]      # phase -> peak bytes above the resident ones (activations + its gradients)
    reference: str
    phase_grads: dict[str, int]
    components: dict | None = None  # the diffusers builders, reused by the levers' plans

    @property
    def resident(self) -> int:
        return sum(r.resident for r in self.roles)

    @property
    def peak(self) -> int:
        return self.resident + max(self.phases.values(), default=0)

    def to_dict(self) -> dict:
        s = {k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v)
             for k, v in attrs.asdict(self.setting).items()}
        return {"setting": s, "reference": self.reference, "roles": [attrs.asdict(r) for r in self.roles],
                "phase_peak_bytes": self.phases, "phase_grad_bytes": self.phase_grads,
                "resident_bytes": self.resident, "peak_bytes": self.peak}


# -- building a plan ---------------------------------------------------------------------------------------

def plan_diffusers(cfg: RunConfig, s: Setting, components: dict, phases, guidance: bool, cuda_norms=True,
                   simulate=True) -> Plan:
    from plugins.diffusers.shared import SharedBase

    fake = memsim.fake_mode()
    net_name = "transformer" if "transformer" in components else "unet"
    build_net = components[net_name]
    frozen = [plan_nets.to_fake(plan_nets.on_meta(b, s.teacher_dtype), fake).requires_grad_(False)
              for k, b in components.items() if k.startswith("text_encoder") or k == "vae"]
    vae = frozen.pop() if "vae" in components else None  # the builders list the VAE last
    encoders = frozen
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
    opt = s.optimizer
    with torch.device("meta"):
        if s.shared_base:
            shared = SharedBase(build_net(), rank=s.student_lora or 64, alpha=s.lora_alpha, base_dtype=s.teacher_dtype)
        else:
            teacher = build_net().to(s.teacher_dtype).requires_grad_(False)
            student, critic = build_net(), build_net()
            for net, rank in ((student, s.student_lora), (critic, s.critic_lora)):
                if rank:
                    net.requires_grad_(False).to(s.lora_base_dtype)
                    plan_nets.add_adapter(net, rank, s.lora_alpha)
    if s.shared_base:
        base = plan_nets.to_fake(shared, fake)
        teacher = student = critic = base.unet
        nets = {r: (lambda *a, _r=r, **k: shared(_r, *a, **k)) for r in ("teacher", "student", "critic")}
        roles = [role("teacher", [teacher], opt, s.teacher_on_gpu, only=lambda n: "lora_" not in n),
                 role("student", [teacher], opt, only=lambda n: "lora_" in n and ".student." in n, adapter=True),
                 role("critic", [teacher], opt, only=lambda n: "lora_" in n and ".critic." in n, adapter=True)]
    else:
        teacher, student, critic = (plan_nets.to_fake(m, fake) for m in (teacher, student, critic))
        nets = {"teacher": teacher, "student": student, "critic": critic}
        roles = [role("teacher", [teacher], opt, s.teacher_on_gpu), role("student", [student], opt),
                 role("critic", [critic], opt)]
    cfg_net = teacher.config
    latent = s.latent or (int(cfg_net.sample_size),) * 2
    text_len = sum(int(getattr(e.config, "max_position_embeddings", 77)) for e in encoders[:1]) or 77
    if net_name == "transformer":
        text_len += int(getattr(cfg.teacher.config, "max_sequence_length", 256))
    trained = [m for m in (student, critic)]
    with fake:
        for m in trained:
            m.train()
            if s.checkpointing:
                m.enable_gradient_checkpointing()
    has = {"teacher", "student", "critic"}
    if s.gan and "gan_head" in {n for p in phases for n in p.trains}:
        from core.gan import GANHead

        head = plan_nets.to_fake(plan_nets.on_meta(lambda: GANHead(plan_nets.gan_feature_shape(teacher, latent))), fake)
        roles.append(role("gan_head", [head], opt))
    if encoders:
        roles.append(role("text_encoders", encoders, opt, s.encoders_on_gpu))
    if vae is not None:
        roles.append(role("vae", [vae], opt, s.encoders_on_gpu))
    if s.ema:  # a copy of the student module (with a frozen base, that too), no gradients; shared: the adapter
        only = (lambda n: "lora_" in n and ".student." in n) if s.shared_base else None
        roles.append(attrs.evolve(role("ema", [student], opt, only=only), grad=0, optim=0, trainable=0))

    def call(name, batch, grad):
        args, kwargs = plan_nets.denoiser_inputs(teacher, batch, latent, text_len)
        with torch.set_grad_enabled(grad):
            out = nets[name](*args, **kwargs)
        return out.sample if hasattr(out, "sample") else out[0]

    peaks = {p.name: 0 for p in phases}
    if simulate:
        with fake:
            it = Iteration(call, has, [teacher, student, critic])
            peaks = {p.name: phase_peak(it, p.trains, s, guidance, cuda_norms) for p in phases}
    if simulate and not s.teacher_on_gpu:  # teacher.offload: its weights are on the GPU while the generator runs it
        for p in phases:
            if "student" in p.trains:
                peaks[p.name] += sum(roles[0].params.values())
    grads = {p.name: sum(r.grad for r in roles if r.name in p.trains) for p in phases}
    return Plan(s, roles, peaks, components["reference"] + f"; latent {latent[0]}x{latent[1]} "
                f"({latent[0] * vae_scale}x{latent[1] * vae_scale} px)", grads,
                components)


def plan_generic(cfg: RunConfig, s: Setting, phases, guidance: bool, simulate=True) -> Plan:
    """Teachers without a diffusers pipeline: the plugins' own factories, student and critic on fake tensors."""
    reg = get_registry()
    teacher = reg.get("teacher", cfg.teacher.name).factory(cfg.teacher.config, "cpu")
    with torch.device("meta"):  # the plugins' factories, with nothing allocated
        student = reg.get("student", cfg.student.name).factory(cfg.student.config, teacher, "meta")
        nets = {"teacher": teacher, "student": student}
        if cfg.critic is not None:
            nets["critic"] = reg.get("critic", cfg.critic.name).factory(cfg.critic.config, teacher, student, "meta")
    objective = reg.get("objective", cfg.objective.name).factory(cfg.objective.config)
    nets.update(objective.build(nets) or {})  # e.g. DMD2's GAN head, sized by a forward on meta
    fake = memsim.fake_mode()
    nets = {n: plan_nets.to_fake(m, fake) if n != "teacher" else m for n, m in nets.items()}
    student = nets["student"]
    opt = s.optimizer
    roles = [role("teacher", [teacher] if isinstance(teacher, nn.Module) else [], opt)]
    roles += [role(n, [m], opt) for n, m in nets.items() if n != "teacher"]
    if s.ema:
        roles.append(attrs.evolve(role("ema", [student], opt), grad=0, optim=0, trainable=0))
    num_classes = int(getattr(teacher, "num_classes", 0) or 0)
    t_mid = float(teacher.schedule.t_from_fraction(0.5))

    def call(name, batch, grad):
        x = torch.randn(batch, *teacher.data_shape)
        cond = torch.zeros(batch, dtype=torch.long) if num_classes else None
        with torch.set_grad_enabled(grad):
            return nets[name].denoise(x, torch.full((batch,), t_mid), cond)

    peaks = {p.name: 0 for p in phases}
    if simulate:
        with fake:
            it = Iteration(call, set(nets), [m for m in nets.values() if isinstance(m, nn.Module)])
            peaks = {p.name: phase_peak(it, p.trains, s, guidance) for p in phases}
    grads = {p.name: sum(r.grad for r in roles if r.name in p.trains) for p in phases}
    return Plan(s, roles, peaks, f"teacher={cfg.teacher.name} built by its plugin", grads)


def setting_of(cfg: RunConfig) -> Setting:
    """The run's own memory configuration, for a CUDA target."""
    tr = cfg.train
    batch = max(1, tr.batch // tr.grad_accum)
    fields = dict(batch=batch, autocast=tr.precision in ("auto", "bf16"), ema=tr.ema > 0,
                  optimizer=getattr(tr, "optimizer", "adamw"),
                  gan=getattr(cfg.objective.config, "gan", "off") != "off")
    if cfg.teacher.name in plan_nets.DIFFUSERS_TEACHERS:
        tc = cfg.teacher.config
        res = tc.resolution  # pixels: N or (H, W); the VAE's factor is 8 in every supported family
        hw = (res, res) if isinstance(res, int) else tuple(res) if res else None
        shared = cfg.student.name == "shared-lora"  # student=shared-lora: one base, the student's and critic's adapters
        fields.update(teacher_dtype=DTYPES.get(tc.dtype, torch.bfloat16), checkpointing=tc.gradient_checkpointing,
                      shared_base=shared, lora_alpha=getattr(cfg.student.config, "lora_alpha", 8.0),
                      encoders_on_gpu=getattr(tc, "encoders_on_device", True),
                      teacher_on_gpu=not getattr(tc, "offload", False),
                      latent=(hw[0] // 8, hw[1] // 8) if hw else None,
                      student_lora=getattr(cfg.student.config, "lora_rank", 0) or 0,
                      critic_lora=getattr(cfg.critic.config, "lora_rank", 0) if cfg.critic is not None else 0)
    return Setting(**fields)


def make_plan(cfg: RunConfig, setting: Setting | None = None, components: dict | None = None,
              cuda_norms: bool = True, simulate: bool = True) -> Plan:
    """The plan of ``cfg`` under ``setting`` (default: the run's own); ``cuda_norms=False`` keeps CPU autocast's
    op lists (to compare with a CPU run); ``simulate=False`` skips the phases (activations 0)."""
    reg = get_registry()
    s = setting or setting_of(cfg)
    objective = reg.get("objective", cfg.objective.name).factory(cfg.objective.config)
    phases = list(objective.phases())
    guidance = getattr(cfg.objective.config, "guidance", None) != 1
    if cfg.teacher.name in plan_nets.DIFFUSERS_TEACHERS:
        components = components or plan_nets.diffusers_components(cfg.teacher.name, cfg.teacher.config.path)
        plan = plan_diffusers(cfg, s, components, phases, guidance, cuda_norms, simulate)
    else:
        plan = plan_generic(cfg, s, phases, guidance, simulate)
    head = next((r for r in plan.roles if r.name == "gan_head"), None)
    for p in phases:  # the GAN head is not run in the phases (its activations are small): its gradients only
        if simulate and head is not None and "gan_head" in p.trains:
            plan.phases[p.name] += head.grad
    return plan
