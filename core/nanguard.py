"""Built-in: a non-finite loss or gradient never trains silently (``train.nan_policy``).

Each optimizer step's losses and gradients are checked together, with one host sync per step:
    stop (default): raise ``DivergedError`` naming the phase and the step, before the optimizer steps, so
                    the weights stay finite and no later checkpoint overwrites the last good one;
    skip:           drop that optimizer step (its gradients are discarded) and say so on stderr.
Under torchrun every rank sees the same verdict (the flag is all-reduced), so ranks never part ways.
"""

from __future__ import annotations

import torch

from core import hookimpl
from core.errors import DivergedError


class NonFiniteGuard:
    def __init__(self, policy: str, log):
        self.policy, self.log = policy, log
        self.iteration = 0
        self.bad: torch.Tensor | None = None  # on the device: no sync until the step is about to happen
        self.first_loss: torch.Tensor | None = None
        self.skipped = 0

    @hookimpl
    def fewstep_run_start(self, trainer, start):
        self.iteration = start

    @hookimpl
    def fewstep_iteration_end(self, trainer, step):
        self.iteration = step

    @hookimpl
    def fewstep_phase_loss(self, trainer, phase, loss, metrics):
        flag = ~torch.isfinite(loss.detach()).all()
        self.bad = flag if self.bad is None else self.bad | flag
        if self.first_loss is None:
            self.first_loss = loss.detach()

    @hookimpl(tryfirst=True)
    def fewstep_before_optimizer_step(self, trainer, phase, optimizer):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP: this rank's shards
        bad = (self.bad if self.bad is not None else torch.zeros((), dtype=torch.bool)).to(trainer.device)
        if grads:
            norms = torch._foreach_norm(grads)
            bad = bad | ~torch.isfinite(torch.stack(norms).to(trainer.device)).all()
        bad_any = _any_rank(bad)  # the one host sync of the step
        loss, self.bad, self.first_loss = self.first_loss, None, None
        if not bad_any:
            return
        step = self.iteration + 1
        what = "loss" if loss is not None and not torch.isfinite(loss).all() else "gradient"
        if self.policy == "skip":
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without gradients untouched
            self.skipped += 1
            self.log(f"fewstep: warning: non-finite {what} in phase '{phase.name}' at step {step}; skipped that "
                     f"optimizer step ({self.skipped} so far; train.nan_policy=skip)")
            return
        latest = trainer.store.latest() if trainer.main else None
        kept = f"the last checkpoint (step {latest['step']}) is untouched" if latest else "no checkpoint was written"
        value = f" = {float(loss.float().mean()):g}" if loss is not None and what == "loss" else ""
        raise DivergedError(f"training diverged: non-finite {what}{value} in phase '{phase.name}' at step {step} "
                            f"({kept}); lower the learning rate (train.lr or the objective's lr), check the data, "
                            "or pass train.nan_policy=skip to skip such steps")


def _any_rank(flag: torch.Tensor) -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        flag = flag.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)
