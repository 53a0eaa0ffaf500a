"""The training loop. Objectives compute losses; the loop owns the rest of one iteration: gradients on the
networks a phase trains, backward, clipping, the optimizer step, autocast. Everything else is a neighbour
module (core.roles, core.parallel, core.runstate, core.rundir) or a plugin on the run's lifecycle hooks
(core.hookspecs: metrics log, progress bar, evaluation and previews, EMA, and ``callbacks=[...]``).

Life of one iteration (docs/architecture.md): draw a real batch -> for each phase due this iteration: enable
grads of the networks it trains only; for each loss the phase gives: ``fewstep_phase_loss``, backward, clip,
``fewstep_before_optimizer_step``, step -> ``fewstep_after_phase`` (EMA) -> ``fewstep_log`` when due ->
``fewstep_iteration_end`` (preview) -> checkpoint, ``fewstep_checkpoint``.
"""

from __future__ import annotations

import contextlib
import sys
import time

import pluggy
import torch

from core import distributed, hookspecs, rundir
from core.errors import UsageError
from core.evaluation import Evaluation
from core.nanguard import NonFiniteGuard
from core.parallel import Parallel
from core.protocols import Context, Phase, SamplingSpec, phase_losses
from core.registry import Registry, get_registry
from core.roles import Networks, resolve_device, set_seed
from core.runconfig import RunConfig
from core.runlog import MetricsLog, ProgressBar
from core.runstate import EMA, RunState


class Trainer:
    def __init__(self, cfg: RunConfig, registry: Registry | None = None, log=None, plugins=()):
        """``plugins``: extra objects implementing lifecycle hooks (e.g. a test's probe), on every rank."""
        self.cfg, self.extra_plugins = cfg, list(plugins)
        self.registry = registry or get_registry()
        self.parallel = Parallel(cfg, resolve_device(cfg.train.device), log or (lambda m: print(m, file=sys.stderr)))
        self.device, self.main, self.rank = self.parallel.device, self.parallel.main, self.parallel.rank
        self.micro, self.log = self.parallel.micro, self.parallel.log
        self.out = cfg.out.rstrip("/")
        error = None
        if self.main:
            try:
                rundir.claim(cfg)
            except UsageError as exc:
                error = str(exc)
        error = distributed.broadcast_object(error)
        if error:
            raise UsageError(error)

    def build(self) -> None:
        set_seed(self.cfg.seed)
        self.networks = Networks(self.cfg, self.registry, self.device)
        self.nets, self.objective = self.networks.nets, self.networks.objective
        self.teacher, self.student = self.networks.teacher, self.networks.student
        self.phases: list[Phase] = list(self.objective.phases())
        self.state = RunState(self.cfg, self.networks, self.phases, self.parallel, self.log)
        self.optimizers, self.ema, self.store = self.state.optimizers, self.state.ema, self.state.store
        self.spec: SamplingSpec = self.objective.sampling(self.student)
        bf16 = self.device.type == "cuda" and self.cfg.train.precision in ("auto", "bf16")
        # entering a disabled torch.autocast still costs a few dispatcher calls per loss
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        self.hooks = pluggy.PluginManager("fewstep")
        self.hooks.add_hookspecs(hookspecs)
        self.hook = self.hooks.hook
        self.evaluation = Evaluation(self)
        self.sums, self.counts, self.t0 = {}, {}, time.perf_counter()  # the metrics since the last record
        for name, plugin in self._builtins():
            self.hooks.register(plugin, name=name)
        if self.cfg.train.rng == "per-rank" and self.rank > 0:
            set_seed(distributed.rank_seed(self.cfg.seed, self.rank))  # after the (identical) initialisation

    def _builtins(self):
        """The run's own plugins: the built-in jobs on every rank, the reporting and callbacks on rank 0."""
        yield "evaluation", self.evaluation
        yield "nan-guard", NonFiniteGuard(self.cfg, self.log)
        for i, plugin in enumerate(self.extra_plugins):
            yield f"extra:{i}", plugin
        if self.ema is not None:
            yield "ema", EMA(self.ema, self.student, self.cfg.train.ema, self.cfg.train.ema_start)
        if self.cfg.train.compile:  # issue 15: torch.compile on the networks (core.compiling)
            from core.compiling import Compile

            yield "compile", Compile(self.cfg.train.compile_mode, self.log)
        if not self.main:
            return
        yield "metrics-log", MetricsLog(self.out)
        for name in self.cfg.callbacks:
            info, config = self.registry.get("callback", name), self.cfg.callback_configs.get(name)
            if config is None and info.config is not None:  # a RunConfig built without its callback configs
                config = info.config()
            yield f"callback:{name}", info.factory(config)

    def sampling_model(self):
        return self.state.sampling_model()

    def gather_full(self) -> None:
        """Collective under FSDP: rank 0's unsharded sampling model gets the current weights."""
        self.parallel.gather_full(self.ema if self.ema is not None else self.student)

    # -- the loop -----------------------------------------------------------------------------------------
    def train(self) -> dict:
        """The run, with rank 0 holding the run directory's lock throughout (core.lock)."""
        with rundir.locked(self.out, self.log, self.main):
            return self._train()

    def _train(self) -> dict:
        self.build()
        start = self.state.restore()
        total = self.cfg.train.steps
        if start:
            self.log(f"fewstep: {self.out} is complete (step {start}); raise train.steps to train on"
                     if start >= total else f"fewstep: resuming {self.out} from step {start}")
        if self.main:
            rundir.write_run_files(self.cfg, self.spec)
            self.hooks.register(ProgressBar(self.cfg, start), name="progress")
        self.hook.fewstep_run_start(trainer=self, start=start)
        self.t0 = time.perf_counter()
        for it in range(start, total):
            self.iterate(it)
        self.gather_full()
        result = {"out": self.out, "preview": None, "checkpoint": None, "export": None, "metrics": {},
                  "start": start, "rank": self.rank}
        if self.main:
            result["export"] = rundir.export(self.out, self.sampling_model(), self.spec, (self.teacher, self.objective))
        self.hook.fewstep_run_end(trainer=self, result=result)
        self.parallel.close()
        result["checkpoint"] = self.store.latest()
        return result

    def iterate(self, it: int) -> None:
        """Iteration ``it`` as the run makes it: ``step``, its metrics summed for the next record (written when
        due), ``fewstep_iteration_end``, and the checkpoint when due."""
        tr, sums, counts = self.cfg.train, self.sums, self.counts
        for name, metrics in self.step(it).items():
            for k, v in metrics.items():  # already scalars (run_phase)
                key = f"{name}/{k}"
                sums[key], counts[key] = (sums[key] + v, counts[key] + 1) if key in sums else (v, 1)
        step = it + 1
        if step % tr.log_every == 0 or step == tr.steps:
            means = distributed.all_mean({k: float(sums[k]) / counts[k] for k in sums})
            self.hook.fewstep_log(trainer=self, record={"step": step, **means,
                                                        "time": round(time.perf_counter() - self.t0, 3)})
            sums.clear()
            counts.clear()
        self.hook.fewstep_iteration_end(trainer=self, step=step)
        if step % tr.ckpt_every == 0 or step == tr.steps:
            path = self.state.save(step, self.spec)
            if self.main:
                self.hook.fewstep_checkpoint(trainer=self, path=path)

    def step(self, it: int) -> dict[str, dict]:
        """One iteration: a fresh batch, then every phase due; returns each phase's metrics."""
        batches = self.parallel.micro_batches(self.networks.dataset, self.teacher)
        first, total = self.rank * len(batches), self.parallel.total_batch  # this rank's micro-batches' place
        ctxs = [Context(self.nets, batch, it, self.micro, self.device, row_offset=(first + j) * self.micro,
                        global_batch=total) for j, batch in enumerate(batches)]
        metrics = {p.name: self.run_phase(p, ctxs, it) for p in self.phases if it % p.every == p.offset}
        self.state.step_schedules()
        return metrics

    def run_phase(self, phase: Phase, ctxs: list[Context], it: int) -> dict:
        """One phase: an optimizer step after each loss it gives (each micro-batch's share accumulated)."""
        self.parallel.train_only(phase.trains, self.state.params)
        opt = self.optimizers[phase.name]
        clip = phase.grad_clip if phase.grad_clip is not None else self.cfg.train.grad_clip
        sums, counts = {}, {}
        for _ in range(phase.repeats):
            streams = [phase_losses(self.objective, phase.name, ctx) for ctx in ctxs]
            while (metrics := self._optimizer_step(phase, opt, clip, streams)) is not None:
                for k, v in metrics.items():
                    v = _scalar(v)
                    sums[k], counts[k] = (sums[k] + v, counts[k] + 1) if k in sums else (v, 1)
        # drop every grad so terms that reached other networks (e.g. GAN into the critic) don't leak
        for p in self.state.all_params:
            p.grad = None
        metrics = {k: sums[k] / counts[k] if counts[k] > 1 else sums[k] for k in sums}
        self.hook.fewstep_after_phase(trainer=self, phase=phase, iteration=it, metrics=metrics)
        return metrics

    def _optimizer_step(self, phase: Phase, opt, clip, streams) -> dict | None:
        """The next loss of every micro-batch's stream, backward, clip and step; None when the phase is done."""
        opt.zero_grad(set_to_none=True)
        restart, A = self.parallel.begin_step(), len(streams)
        stepped, parts = False, []
        for j, stream in enumerate(streams):
            restart()  # micro-batches replay the step's draws (docs/distributed.md)
            with self.parallel.grad_sync(phase.trains, self.nets, j == A - 1):
                with self.parallel.draws(self.rank * A + j), self.autocast():
                    out = next(stream, None)
                if out is None:
                    return None
                loss, metrics = out
                self.hook.fewstep_phase_loss(trainer=self, phase=phase, loss=loss, metrics=metrics)
                if loss.requires_grad:
                    (loss / A if A > 1 else loss).backward()
                    stepped = True
            parts.append({"loss": loss, **metrics})
        metrics = parts[0] if A == 1 else {k: sum(_scalar(p[k]) for p in parts if k in p) / A for k in parts[0]}
        if stepped:
            self.parallel.average_unreached(phase.trains, self.state.params)
            grad_norm = None
            if clip:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.state.phase_params[phase.name], clip)
                metrics = {**metrics, "grad_norm": grad_norm}
            self.hook.fewstep_before_optimizer_step(trainer=self, phase=phase, optimizer=opt, grad_norm=grad_norm)
            opt.step()
        return metrics


def _scalar(v):
    """A logged metric as a float tensor (or float); a DTensor (FSDP grad norm) as its full value."""
    if hasattr(v, "full_tensor"):
        v = v.full_tensor()
    return v.detach().float() if torch.is_tensor(v) else float(v)
