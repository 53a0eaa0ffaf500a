"""Built-in: a non-finite loss or gradient never trains silently (``train.nan_policy``).

Every optimizer step's losses and gradient norms are checked on the device.
    stop (default): the first non-finite step is remembered on the device (no host sync in the loop) and the
                    run stops at the next log, preview or checkpoint step, before anything is written, with a
                    ``DivergedError`` naming the phase and the first bad step; the last checkpoint stays good.
    skip:           the optimizer step is dropped (its gradients discarded) and stderr says so; this costs one
                    host sync per optimizer step, so it is opt-in.
Under torchrun the verdict is all-reduced, so every rank stops (or skips) together.
"""

from __future__ import annotations

import torch

from core import hookimpl
from core.errors import DivergedError


class NonFiniteGuard:
    def __init__(self, cfg, log):
        self.policy, self.log, self.train = cfg.train.nan_policy, log, cfg.train
        self.iteration = 0
        self.loss_bad: torch.Tensor | None = None  # this optimizer step's losses, on the device
        self.first_bad: dict[str, torch.Tensor] = {}  # phase -> first bad step (-1: none), on the device
        self.what: dict[str, torch.Tensor] = {}  # phase -> 1 when the first bad value was a loss, 0 a gradient
        self.skipped = 0

    @hookimpl
    def fewstep_run_start(self, trainer, start):
        self.iteration = start

    @hookimpl
    def fewstep_phase_loss(self, trainer, phase, loss, metrics):
        flag = ~torch.isfinite(loss.detach()).all()
        self.loss_bad = flag if self.loss_bad is None else self.loss_bad | flag

    @hookimpl(tryfirst=True)
    def fewstep_before_optimizer_step(self, trainer, phase, optimizer):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP: this rank's shards
        loss_bad = (self.loss_bad if self.loss_bad is not None else torch.zeros((), dtype=torch.bool))
        loss_bad, self.loss_bad = loss_bad.to(trainer.device), None
        bad = loss_bad
        if grads:
            bad = bad | ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).to(trainer.device)).all()
        step = self.iteration + 1
        if self.policy == "skip":
            if _any_rank(bad):  # one host sync per optimizer step
                optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without gradients untouched
                self.skipped += 1
                self.log(f"fewstep: warning: non-finite {'loss' if bool(loss_bad) else 'gradient'} in phase "
                         f"'{phase.name}' at step {step}; skipped that optimizer step ({self.skipped} so far; "
                         "train.nan_policy=skip)")
            return
        first = self.first_bad.setdefault(phase.name, torch.full((), -1, dtype=torch.long, device=trainer.device))
        new = bad & (first < 0)
        self.what[phase.name] = torch.where(new, loss_bad.long(), self.what.get(phase.name, torch.zeros_like(first)))
        first.copy_(torch.where(new, torch.full_like(first, step), first))

    @hookimpl(tryfirst=True)
    def fewstep_log(self, trainer, record):
        self._check(trainer)  # before the record is written

    @hookimpl(tryfirst=True)
    def fewstep_iteration_end(self, trainer, step):
        tr = self.train
        due = step % tr.ckpt_every == 0 or step == tr.steps or (tr.preview_every and step % tr.preview_every == 0)
        if due:
            self._check(trainer)  # before a preview or a checkpoint is written
        self.iteration = step

    def _check(self, trainer) -> None:
        if self.policy != "stop" or not self.first_bad:
            return
        names = list(self.first_bad)
        firsts = torch.stack([self.first_bad[n] for n in names])
        if not _any_rank((firsts >= 0).any()):
            return
        local = [(s, n) for n, s in zip(names, firsts.tolist()) if s >= 0]
        latest = trainer.store.latest() if trainer.main else None
        kept = f"the last checkpoint (step {latest['step']}) is untouched" if latest else "no checkpoint was written"
        if local:
            step, phase = min(local)
            where = f"non-finite {'loss' if int(self.what[phase]) else 'gradient'} in phase '{phase}' at step {step}"
        else:
            where = f"non-finite values on another rank by step {self.iteration + 1}"
        raise DivergedError(f"training diverged: {where} ({kept}); "
                            "lower the learning rate (train.lr or the objective's lr), check the data, or pass "
                            "train.nan_policy=skip to skip such steps")


def _any_rank(flag: torch.Tensor) -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        flag = flag.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)
