"""``python -m core.run plan <the overrides of a run> [plan.gpu_memory=GiB] [plan.levers=false] [--json]``:
will this run fit the GPU, and if not, what would make it fit? (docs/memory.md)

Prints per role (teacher, student, critic, GAN head, text encoders, VAE, EMA) the parameter bytes by dtype,
gradient and optimizer-state bytes, each phase's activations (core.plan_model counts them on fake tensors),
the peak against the GPU's memory (default: the visible CUDA device, else 80 GiB), and when it does not fit,
the peak under each memory lever. Nothing is trained, downloaded or written.
"""

from __future__ import annotations

import functools
import json
import sys

import attrs
import torch

from core.cli import load_tree
from core.config import converter
from core.errors import UsageError
from core.plan_model import GiB, Plan, Setting, make_plan, setting_of
from core.plan_nets import DIFFUSERS_TEACHERS
from core.runconfig import RunConfig, resolve

GB = 1e9
DEFAULT_GPU_GIB = 80.0


def gpu_memory_gib(given: float | None) -> tuple[float, str]:
    if given is not None:
        return given, "plan.gpu_memory"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory / GiB, props.name
    return DEFAULT_GPU_GIB, "default (no CUDA device visible)"


def levers(cfg: RunConfig, s: Setting) -> list[tuple[str, Setting]]:
    """(what to set, the setting it gives) for every memory lever the run does not use yet; "planned" ones
    have no run option yet (fewstep issue 15)."""
    out = []
    diffusers = cfg.teacher.name in DIFFUSERS_TEACHERS
    if diffusers and not s.shared_base:
        if not s.student_lora:
            out.append(("student.lora_rank=64", attrs.evolve(s, student_lora=64)))
        if not s.critic_lora:
            out.append(("critic.lora_rank=64", attrs.evolve(s, critic_lora=64)))
        if s.lora_base_dtype != torch.bfloat16 and (s.student_lora or s.critic_lora):
            out.append(("bf16 frozen LoRA base (planned)", attrs.evolve(s, lora_base_dtype=torch.bfloat16)))
    if s.optimizer != "adamw8bit":
        out.append(("train.optimizer=adamw8bit", attrs.evolve(s, optimizer="adamw8bit")))
    if diffusers and not s.checkpointing:
        out.append(("teacher.gradient_checkpointing=true", attrs.evolve(s, checkpointing=True)))
    if s.ema:
        out.append(("train.ema=0", attrs.evolve(s, ema=False)))
    if diffusers:
        if s.encoders_on_gpu:
            out.append(("teacher.encoders_on_device=false (encoders on the CPU, outputs cached)",
                        attrs.evolve(s, encoders_on_gpu=False)))
        if s.teacher_on_gpu and not s.shared_base:
            out.append(("teacher.offload=true (teacher weights on the CPU between its forwards)",
                        attrs.evolve(s, teacher_on_gpu=False)))
        if not s.shared_base:
            out.append(("student=shared-lora critic=shared-lora (one base + two rank-64 adapters)",
                        attrs.evolve(s, shared_base=True, student_lora=64, critic_lora=64)))
    return out


ACTIVATION_KEYS = ("batch", "latent", "autocast", "teacher_dtype", "student_lora", "critic_lora", "lora_base_dtype",
                   "checkpointing", "shared_base", "cfg_passes", "gan")


def replan(cfg: RunConfig, base: Plan, s: Setting, components, label: str = "", log=None) -> Plan:
    """The plan under setting ``s``; phases are re-run only when ``s`` changes what they hold."""
    if all(getattr(s, k) == getattr(base.setting, k) for k in ACTIVATION_KEYS):
        fresh = make_plan(cfg, s, components, simulate=False)
        return attrs.evolve(fresh, phases=base.phases)
    if log is not None:
        log(f"fewstep: plan: counting the activations of: {label}")
    return make_plan(cfg, s, components)


def _gib(n: int) -> str:
    """Bytes in GiB, MiB or KiB (2^30, 2^20, 2^10), whichever reads best."""
    if not n:
        return "-"
    for unit, size in (("GiB", GiB), ("MiB", 2**20)):
        if n >= size / 10:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1024:.1f} KiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.3g} B" if n >= 1e8 else f"{n / 1e6:.3g} M" if n >= 1e5 else str(n)


def format_plan(plan: Plan, gpu_gib: float, gpu_name: str, options: list[tuple[str, Plan]]) -> str:
    s = plan.setting
    lines = [f"fewstep plan: {plan.reference}",
             f"  batch {s.batch}, {'bf16 autocast' if s.autocast else 'fp32'}, optimizer {s.optimizer}, "
             f"gradient checkpointing {'on' if s.checkpointing else 'off'}; GiB = 2^30 bytes, GB = 10^9",
             "",
             f"{'role':<14} {'parameters':>11} {'trainable':>10} {'weights':<26} {'grads':>10} {'optimizer':>10}"
             "  on GPU"]
    for r in plan.roles:
        weights = ", ".join(f"{_gib(b)} {d}" for d, b in sorted(r.params.items())) or "-"
        lines.append(f"{r.name:<14} {_count(r.numel):>11} {_count(r.trainable) if r.trainable else '-':>10} "
                     f"{weights:<26} {_gib(r.grad):>10} {_gib(r.optim):>10}  {'yes' if r.on_gpu else 'no'}")
    lines.append("")
    for name, peak in plan.phases.items():
        grads = plan.phase_grads.get(name, 0)
        lines.append(f"phase {name:<10} activations {_gib(max(0, peak - grads)):>10} + its gradients "
                     f"{_gib(grads):>10} (counted peak of one forward/backward)")
    before = plan.resident + max(plan.phase_grads.values(), default=0)
    lines += ["",
              f"resident (weights + optimizer states): {_gib(plan.resident)}; with the largest phase's gradients, "
              f"before activations: {_gib(before)} ({before / GB:.1f} GB)",
              f"peak: {_gib(plan.peak)} ({plan.peak / GB:.1f} GB) of {gpu_gib:g} GiB ({gpu_name}): "
              + ("fits" if plan.peak <= gpu_gib * GiB
                 else f"does not fit (over by {_gib(plan.peak - int(gpu_gib * GiB))})"),
              "  (fragmentation and kernel workspaces come on top: keep a few GiB spare)"]
    if options:
        lines += ["", "to make it fit (each lever alone, then all together):"]
        for label, p in options:
            verdict = "fits" if p.peak <= gpu_gib * GiB else "does not fit"
            lines.append(f"  {label:<62} peak {_gib(p.peak):>10}  {verdict}")
    return "\n".join(lines)


def parse(argv: list[str]) -> tuple[list[str], float | None, bool, bool]:
    """Run overrides, plus the planner's own: plan.gpu_memory=GiB (or --gpu-memory GiB), plan.levers, --json."""
    rest, gpu, as_json, with_levers = [], None, False, True
    args = iter(argv)
    for arg in args:
        key, _, value = arg.partition("=")
        if arg == "--json":
            as_json = True
        elif arg == "--gpu-memory" or key in ("--gpu-memory", "plan.gpu_memory"):
            value = value if "=" in arg else next(args, "")
            try:
                gpu = converter.structure(value, float)
            except ValueError:
                raise UsageError(f"plan.gpu_memory: expected GiB as a number, got {value!r}") from None
            if gpu <= 0:
                raise UsageError(f"plan.gpu_memory: must be > 0, got {value}")
        elif key == "plan.levers":
            try:
                with_levers = converter.structure(value, bool)
            except ValueError:
                raise UsageError(f"plan.levers: expected true or false, got {value!r}") from None
        elif key.startswith("plan.") or arg.startswith("--"):
            raise UsageError(f"unknown plan option '{arg}'; plan takes plan.gpu_memory=GiB, plan.levers=false, --json")
        else:
            rest.append(arg)
    return rest, gpu, as_json, with_levers


def main(argv: list[str]) -> int:
    rest, gpu, as_json, with_levers = parse(argv)
    cfg = resolve(load_tree(rest))
    gpu_gib, gpu_name = gpu_memory_gib(gpu)
    setting = setting_of(cfg)
    plan = make_plan(cfg, setting)
    options = []
    if with_levers and plan.peak > gpu_gib * GiB:
        components = plan.components
        chosen = levers(cfg, setting)
        log = functools.partial(print, file=sys.stderr, flush=True)  # full-size networks take a minute each
        options = [(label, replan(cfg, plan, s, components, label, log)) for label, s in chosen]
        if len(chosen) > 1:
            combined = setting
            for _, s in chosen:
                combined = attrs.evolve(combined, **{f.name: getattr(s, f.name) for f in attrs.fields(Setting)
                                                     if getattr(s, f.name) != getattr(setting, f.name)})
            options.append(("all of the above", replan(cfg, plan, combined, components, "all of the above", log)))
    if as_json:
        print(json.dumps({**plan.to_dict(), "gpu_memory_gib": gpu_gib, "gpu": gpu_name,
                          "fits": plan.peak <= gpu_gib * GiB,
                          "levers": [{"lever": label, "peak_bytes": p.peak, "fits": p.peak <= gpu_gib * GiB}
                                     for label, p in options]}, indent=1))
    else:
        print(format_plan(plan, gpu_gib, gpu_name, options))
    return 0
