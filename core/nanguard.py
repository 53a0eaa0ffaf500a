"""Built-in: a non-finite loss or gradient never trains silently (``train.nan_policy``).

Every optimizer step's losses and gradient norm (the clip's, when ``train.grad_clip`` is on) are checked on the
device.
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
    FOLD = 256  # optimizer steps held as 0-d device tensors before they are folded into the verdict

    def __init__(self, cfg, log):
        self.policy, self.log, self.train = cfg.train.nan_policy, log, cfg.train
        self.iteration = 0
        self.losses: list[torch.Tensor] = []  # this optimizer step's losses, on the device
        self.pending: list[tuple] = []  # (phase, step, loss, gradient probe) per step not yet folded
        self.first_bad: dict[str, torch.Tensor] = {}  # phase -> first bad step (-1: none), on the device
        self.what: dict[str, torch.Tensor] = {}  # phase -> 1 when the first bad value was a loss, 0 a gradient
        self.skipped = 0

    @hookimpl
    def fewstep_run_start(self, trainer, start):
        self.iteration = start

    @hookimpl
    def fewstep_phase_loss(self, trainer, phase, loss, metrics):
        self.losses.append(loss.detach())

    @hookimpl(tryfirst=True)
    def fewstep_before_optimizer_step(self, trainer, phase, optimizer, grad_norm):
        losses, self.losses = self.losses, []
        loss = losses[0] if len(losses) == 1 else torch.stack([v.float().sum() for v in losses]).sum()
        # the clip's norm is non-finite exactly when a gradient is; without a clip (or under FSDP, whose norm
        # is a DTensor) this rank's gradients are probed here
        probe = grad_norm if torch.is_tensor(grad_norm) and not hasattr(grad_norm, "full_tensor") else \
            _gradient_probe(optimizer, trainer.device)
        step = self.iteration + 1
        if self.policy == "skip":
            loss_bad = ~torch.isfinite(loss.to(trainer.device)).all()
            if _any_rank(loss_bad | ~torch.isfinite(probe)):  # one host sync per optimizer step
                optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without gradients untouched
                self.skipped += 1
                self.log(f"fewstep: warning: non-finite {'loss' if bool(loss_bad) else 'gradient'} in phase "
                         f"'{phase.name}' at step {step}; skipped that optimizer step ({self.skipped} so far; "
                         "train.nan_policy=skip)")
            return
        self.pending.append((phase.name, step, loss, probe))  # no device work on the hot path
        if len(self.pending) >= self.FOLD:
            self._fold(trainer.device)

    def _fold(self, device) -> None:
        """The pending steps into ``first_bad`` and ``what``, on the device (no host sync)."""
        rows: dict[str, list] = {}
        for name, *row in self.pending:
            rows.setdefault(name, []).append(row)
        self.pending = []
        for name, steps in rows.items():
            loss_bad = ~torch.isfinite(torch.stack([loss.float().sum().to(device) for _, loss, _ in steps]))
            bad = loss_bad | ~torch.isfinite(torch.stack([probe.float().to(device) for _, _, probe in steps]))
            i = bad.int().argmax()  # the first bad step of these (0 when none is)
            first = self.first_bad.setdefault(name, torch.full((), -1, dtype=torch.long, device=device))
            new = bad[i] & (first < 0)
            self.what[name] = torch.where(new, loss_bad[i].long(), self.what.get(name, torch.zeros_like(first)))
            first.copy_(torch.where(new, torch.tensor([s for s, _, _ in steps], device=device)[i], first))

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
        if self.policy != "stop":
            return
        if self.pending:
            self._fold(trainer.device)
        if not self.first_bad:
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


def _gradient_probe(optimizer, device) -> torch.Tensor:
    """A 0-d value that is finite exactly when every gradient this optimizer steps is (this rank's shards)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    if not grads:
        return torch.zeros((), device=device)
    return torch.stack(torch._foreach_norm(grads)).sum().to(device)


def _any_rank(flag: torch.Tensor) -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        flag = flag.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)
