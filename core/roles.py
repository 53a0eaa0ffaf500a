"""A run's network roles built from its config: teacher, data, student, critic, objective and the objective's
own modules. Shared by training, sampling (``core.sample``) and ``teacher=checkpoint``."""

from __future__ import annotations

import torch

from core.errors import UsageError
from core.registry import Registry, get_registry
from core.runconfig import RunConfig


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    return torch.device(name)


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


class Networks:
    """Builds every role of a run from its config (in this order, so weights initialise from the seed alike)."""

    def __init__(self, cfg: RunConfig, registry: Registry | None = None, device="cpu", with_critic: bool = True):
        self.registry = registry or get_registry()
        reg = self.registry
        self.device = torch.device(device)
        self.teacher = reg.get("teacher", cfg.teacher.name).factory(cfg.teacher.config, self.device)
        if isinstance(self.teacher, torch.nn.Module):
            self.teacher.requires_grad_(False).eval()
        self.dataset = None if cfg.data is None else reg.get("dataset", cfg.data.name).factory(cfg.data.config, self.teacher)
        self.student = reg.get("student", cfg.student.name).factory(cfg.student.config, self.teacher, self.device)
        self.student.to(self.device)
        self.objective = reg.get("objective", cfg.objective.name).factory(cfg.objective.config)
        self.nets: dict = {"teacher": self.teacher, "student": self.student}
        if cfg.critic is not None and with_critic:
            critic = reg.get("critic", cfg.critic.name).factory(cfg.critic.config, self.teacher, self.student, self.device)
            self.nets["critic"] = critic.to(self.device)
        if with_critic:
            for name, module in (self.objective.build(self.nets) or {}).items():
                if name in self.nets:
                    raise UsageError(f"objective '{cfg.objective.name}' builds a module named '{name}', "
                                     "which clashes with a network role")
                self.nets[name] = module.to(self.device)

    @property
    def trainable(self) -> dict[str, torch.nn.Module]:
        return {k: v for k, v in self.nets.items() if k != "teacher" and isinstance(v, torch.nn.Module)}
