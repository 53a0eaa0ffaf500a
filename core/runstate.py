"""What a checkpoint holds, and how it is saved and restored: the trainable networks, the EMA of the student,
one AdamW and one learning-rate schedule per phase, and the RNG streams (core.checkpoint stores the files)."""

from __future__ import annotations

import copy
import functools
import math
import warnings

import attrs
import torch

from core import checkpoint as ckpt
from core import distributed, files, hookimpl
from core.errors import UsageError
from core.roles import set_seed



def lr_factor(iteration: int, warmup: int, total: int, decay: str) -> float:
    """Linear warm-up over ``warmup`` iterations, then none / linear / cosine decay to zero at ``total``."""
    if warmup and iteration < warmup:
        return (iteration + 1) / warmup
    if decay == "none":
        return 1.0
    frac = (iteration - warmup) / max(1, total - warmup)
    return max(0.0, 1 - frac) if decay == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def make_optimizer(kind: str, params, device: torch.device, **hyper) -> torch.optim.Optimizer:
    """``train.optimizer``: torch's AdamW (fused on CUDA), or bitsandbytes' AdamW8bit (optional dependency)."""
    if kind == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise UsageError("train.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes "
                             "(or use train.optimizer=adamw)") from None
        return bitsandbytes.optim.AdamW8bit(params, **hyper)
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, **hyper, **fused)


class RunState:
    def __init__(self, cfg, networks, phases, parallel, log):
        self.cfg, self.networks, self.parallel, self.log = cfg, networks, parallel, log
        tr = cfg.train
        trainable = networks.trainable
        self.ema = copy.deepcopy(networks.student).requires_grad_(False) if tr.ema > 0 else None
        parallel.wrap(trainable, self.ema, networks.student)
        self.params = {k: [p for p in m.parameters() if p.requires_grad] for k, m in trainable.items()}
        self.all_params = [p for ps in self.params.values() for p in ps]
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.phase_params: dict[str, list] = {}  # what each phase's optimizer steps (and its grad clip reads)
        for phase in phases:
            missing = [n for n in phase.trains if n not in self.params]
            if missing:
                raise UsageError(f"objective phase '{phase.name}' trains {missing}, which this run does not have "
                                 f"(it has {sorted(self.params)})")
            params = self.phase_params[phase.name] = [p for n in phase.trains for p in self.params[n]]
            self.optimizers[phase.name] = make_optimizer(tr.optimizer, params, parallel.device, lr=tr.lr or phase.lr,
                                                         betas=phase.betas, eps=phase.eps,
                                                         weight_decay=phase.weight_decay)
        factor = functools.partial(lr_factor, warmup=tr.warmup, total=tr.steps, decay=tr.lr_decay)
        self.schedules = {name: torch.optim.lr_scheduler.LambdaLR(opt, factor) for name, opt in self.optimizers.items()}
        self.store = ckpt.CheckpointStore(cfg.out.rstrip("/"), keep=tr.keep)

    @property
    def modules(self) -> dict:
        """The checkpointed modules by prefix: the trainable networks and ``ema``."""
        return {**self.networks.trainable, **({"ema": self.ema} if self.ema is not None else {})}

    def sampling_model(self):
        if self.parallel.full is not None:
            return self.parallel.full
        return self.ema if self.ema is not None else self.networks.student

    def step_schedules(self, to: int | None = None) -> None:
        """Every phase's learning rate moves to the next iteration, or to iteration ``to`` (the schedules count
        the run's iterations, so a phase that skips iterations advances without stepping its optimizer:
        torch's warning about that order is expected here)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            for schedule in self.schedules.values():
                if to is not None:
                    schedule.last_epoch = to - 1
                schedule.step()

    # -- save ---------------------------------------------------------------------------------------------
    def save(self, iteration: int, spec) -> str:
        if self.parallel.world > 1:
            return self._save_sharded(iteration, spec)
        tensors, opt_state = {}, {}
        for name, opt in self.optimizers.items():
            t, s = ckpt.flatten_optimizer(f"opt.{name}", opt.state_dict())
            tensors.update(t)
            opt_state[name] = s
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda{i}"] = s
        weights = {f"{prefix}.{k}": v for prefix, m in self.modules.items() for k, v in m.state_dict().items()}
        state = {"step": iteration, "optimizers": opt_state, "spec": attrs.asdict(spec)}
        return self.store.save(iteration, weights, tensors, state)

    def _save_sharded(self, iteration: int, spec) -> str:
        """Collective: torch.distributed.checkpoint shards plus this rank's RNG (docs/distributed.md)."""
        p = self.parallel
        rng = {"rng.cpu": torch.get_rng_state()}
        if p.device.type == "cuda":
            rng["rng.cuda"] = torch.cuda.get_rng_state(p.device)
        state = {"step": iteration, "spec": attrs.asdict(spec), "world_size": p.world, "rng": self.cfg.train.rng}
        return self.store.save_sharded(iteration, self.modules, self.optimizers, rng, state, p.rank, p.main)

    # -- restore ------------------------------------------------------------------------------------------
    def _restore_rng(self, cpu: torch.Tensor, cuda: torch.Tensor | None, own: bool, step: int) -> None:
        """Shared stream: every rank takes the saved one. Per-rank streams: a rank the checkpoint did not
        have (resumed on more ranks) starts a fresh stream derived from (seed, rank, step)."""
        p = self.parallel
        if self.cfg.train.rng == "per-rank" and not own:
            set_seed(distributed.rank_seed(self.cfg.seed + step, p.rank))
            self.log(f"fewstep: rank {p.rank} had no saved RNG stream; seeded a new one")
            return
        torch.set_rng_state(cpu)
        if cuda is not None and p.device.type == "cuda":
            torch.cuda.set_rng_state(cuda, p.device)

    def restore(self) -> int:
        """The iteration to start at: the latest checkpoint's step (0 without one)."""
        step = self._load()
        self.step_schedules(to=step)
        return step

    def _load(self) -> int:
        p, latest = self.parallel, self.store.latest()
        if latest is not None and latest.get("format") == "dcp":
            rng, state = self.store.load_sharded(self.modules, self.optimizers, p.rank)
            step = int(state["step"])
            self._restore_rng(rng["rng.cpu"], rng.get("rng.cuda"), state["rng_rank"] == p.rank, step)
            return step
        if latest is not None and p.mode == "fsdp":
            raise UsageError(f"out={self.cfg.out} holds a single-process checkpoint; resume it once with "
                             "train.parallel=ddp (or in one process), then switch to fsdp")
        loaded = self.store.load(p.device)
        if loaded is None:
            return 0
        weights, tensors, state = loaded
        d = files.join(self.store.root, self.store.latest()["dir"])
        ckpt.load_modules(self.modules, weights, files.join(d, "weights.safetensors"))  # names the keys that differ
        ckpt.load_optimizers(self.optimizers, state, tensors, files.join(d, "state.json"))
        step = int(state["step"])
        if p.world > 1:
            idx = p.device.index or 0
            self._restore_rng(tensors["rng.cpu"], tensors.get(f"rng.cuda{idx}"), p.rank == 0, step)
            return step
        torch.set_rng_state(tensors["rng.cpu"])
        if torch.cuda.is_available() and "rng.cuda0" in tensors:
            torch.cuda.set_rng_state_all([tensors[f"rng.cuda{i}"] for i in range(torch.cuda.device_count())
                                          if f"rng.cuda{i}" in tensors])
        return step


class EMA:
    """Built-in: the student's exponential moving average, after every phase that trains the student; before
    iteration ``start`` it copies the student (a stateless rule, so resuming needs nothing extra)."""

    def __init__(self, ema: torch.nn.Module, student: torch.nn.Module, decay: float, start: int = 0):
        self.ema_params, self.params, self.decay = list(ema.parameters()), list(student.parameters()), decay
        self.start = start

    @hookimpl
    def fewstep_after_phase(self, trainer, phase, iteration, metrics):
        if "student" in phase.trains:
            with torch.no_grad():
                weight = 1.0 if iteration < self.start else 1 - self.decay
                torch._foreach_lerp_(self.ema_params, self.params, weight)
