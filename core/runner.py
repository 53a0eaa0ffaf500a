"""The training runner. Objectives compute losses; this owns everything else: building the networks,
per-phase optimizers, backward, clipping, stepping, autocast, EMA, logging, previews and checkpoints.

Life of one iteration (docs/architecture.md): draw a real batch -> for each phase due this iteration
(and each repeat): enable grads of the networks it trains only, loss = objective.loss(phase, ctx),
backward, clip, step, update the EMA -> log -> evaluate / preview / checkpoint when due.

Under torchrun (docs/distributed.md) every rank runs this loop on its rows of the global batch, split
further into ``train.grad_accum`` micro-batches; DDP or FSDP2 averages the gradients, so one optimizer
step sees the whole global batch. Rank 0 alone logs, previews, evaluates and exports.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time

import attrs
import fsspec
import torch
import yaml
from tqdm import tqdm

from core import checkpoint as ckpt
from core import distributed
from core.errors import RunDirError, RunLockedError, UsageError
from core.lock import LOCK_NAME, RunLock
from core.protocols import Context, Phase, SamplingSpec
from core.registry import Registry, get_registry
from core.runconfig import RunConfig
from core.sampling import generate


RUN_DIR_FIX = "restore the file from a backup, or retrain into a new out="


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
    """Builds every role of a run from its config. Shared by training, sampling and ``teacher=checkpoint``."""

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


def lr_factor(iteration: int, warmup: int, total: int, decay: str) -> float:
    if warmup and iteration < warmup:
        return (iteration + 1) / warmup
    if decay == "none":
        return 1.0
    frac = (iteration - warmup) / max(1, total - warmup)
    return max(0.0, 1 - frac) if decay == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


class Trainer:
    def __init__(self, cfg: RunConfig, registry: Registry | None = None, log=None):
        self.cfg = cfg
        self.registry = registry or get_registry()
        device = resolve_device(cfg.train.device)
        self._owns_group = distributed.init_from_env(device.type)
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.main = self.rank == 0
        if self.world > 1 and device.type == "cuda":
            device = torch.device("cuda", distributed.local_rank())
            torch.cuda.set_device(device)
        self.device = device
        log = log or (lambda msg: print(msg, file=sys.stderr))
        self.log = log if self.main else (lambda msg: None)
        distributed.check_agreement(cfg.to_dict())
        self.parallel = self._parallel_mode()
        self.micro, self.total_batch = self._batch_sizes()
        tr = cfg.train
        # one shared stream sliced per micro-batch (docs/distributed.md); off for a plain 1-process run
        self.sliced = tr.rng == "shared" and self.total_batch > self.micro
        self.replay = self.sliced and tr.grad_accum > 1
        self.out = cfg.out.rstrip("/")
        self.fs, self.out_path = ckpt.filesystem(self.out)
        self.store = ckpt.CheckpointStore(self.out, keep=cfg.train.keep)
        error = None
        if self.main:
            try:
                self._check_existing_run()
            except UsageError as exc:
                error = str(exc)
        error = distributed.broadcast_object(error)
        if error:
            raise UsageError(error)

    def _parallel_mode(self) -> str:
        tr = self.cfg.train
        if self.world == 1:
            if tr.parallel != "none":
                self.log(f"fewstep: train.parallel={tr.parallel} in a single process (not under torchrun); "
                         "training without it")
            return "none"
        if tr.parallel == "none":
            raise UsageError(f"launched on {self.world} ranks but train.parallel=none; pass train.parallel=ddp "
                             "(or fsdp) so the ranks share gradients")
        return tr.parallel

    def _batch_sizes(self) -> tuple[int, int]:
        """(micro-batch per forward on one rank, global batch per optimizer step)."""
        tr = self.cfg.train
        splits = self.world * tr.grad_accum
        if tr.batch_scope == "rank":
            return tr.batch, tr.batch * splits
        if tr.batch % splits:
            raise UsageError(f"train.batch={tr.batch} (global) does not split over {self.world} rank(s) x "
                             f"train.grad_accum={tr.grad_accum}; use a multiple of {splits} or train.batch_scope=rank")
        return tr.batch // splits, tr.batch

    # -- set-up -------------------------------------------------------------------------------------
    def _check_existing_run(self) -> None:
        """An out dir that holds a different run is an error, never overwritten."""
        RunLock(self.out).check()
        cfg_url = ckpt.join(self.out, "config.yaml")
        if not ckpt.exists(cfg_url):
            if self.fs.exists(self.out_path) and [p for p in self.fs.ls(self.out_path, detail=False)
                                                  if not p.rstrip("/").endswith(LOCK_NAME)]:
                raise UsageError(f"out={self.out} exists and is not a fewstep run; choose an empty or new directory")
            return
        old = ckpt.read_yaml(cfg_url, fix=RUN_DIR_FIX)
        if not isinstance(old, dict):
            raise RunDirError(f"{cfg_url} holds no run config ({type(old).__name__}); {RUN_DIR_FIX}")
        new = self.cfg.to_dict()
        # how the work is spread (ranks, sharding, micro-batches of a fixed global batch) may change on resume
        ignore = {("train", "steps"), ("train", "progress"), ("train", "device"), ("train", "parallel"),
                  ("train", "fsdp_offload")}
        if new["train"].get("batch_scope") == "global":
            ignore.add(("train", "grad_accum"))
        diffs = []
        for group in set(old) | set(new):
            a, b = old.get(group), new.get(group)
            if isinstance(a, dict) and isinstance(b, dict):
                for k in set(a) | set(b):
                    if (group, k) not in ignore and a.get(k) != b.get(k):
                        diffs.append(f"{group}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
            elif a != b and group != "out":
                diffs.append(f"{group}: {a!r} -> {b!r}")
        if diffs:
            raise UsageError(f"out={self.out} holds a run with a different config ({'; '.join(sorted(diffs)[:3])}); "
                             "pass the same settings to resume it, or choose another out=")

    def build(self) -> None:
        set_seed(self.cfg.seed)
        self.networks = Networks(self.cfg, self.registry, self.device)
        self.nets = self.networks.nets
        self.objective = self.networks.objective
        self.teacher, self.student = self.networks.teacher, self.networks.student
        self.phases: list[Phase] = list(self.objective.phases())
        trainable = self.networks.trainable
        self.ema = None
        if self.cfg.train.ema > 0:
            self.ema = copy.deepcopy(self.student).requires_grad_(False)
        self._wrap(trainable)
        self.params: dict[str, list] = {k: [p for p in m.parameters() if p.requires_grad] for k, m in trainable.items()}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        for phase in self.phases:
            missing = [n for n in phase.trains if n not in self.params]
            if missing:
                raise UsageError(f"objective phase '{phase.name}' trains {missing}, which this run does not have "
                                 f"(it has {sorted(self.params)})")
            params = [p for n in phase.trains for p in self.params[n]]
            lr = self.cfg.train.lr or phase.lr
            fused = {"fused": True} if self.device.type == "cuda" else {}
            self.optimizers[phase.name] = torch.optim.AdamW(params, lr=lr, betas=phase.betas, eps=phase.eps,
                                                            weight_decay=phase.weight_decay, **fused)
        self.base_lr = {name: opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()}
        self.spec: SamplingSpec = self.objective.sampling(self.student)
        self.callbacks = [self.registry.get("callback", name).factory(None) for name in self.cfg.callbacks]
        self.exact = hasattr(self.teacher, "sample_exact")
        self.autocast = (self.device.type == "cuda" and self.cfg.train.precision in ("auto", "bf16"))
        if self.cfg.train.rng == "per-rank" and self.rank > 0:
            set_seed(distributed.rank_seed(self.cfg.seed, self.rank))  # after the (identical) initialisation

    def _wrap(self, trainable: dict) -> None:
        """DDP (gradients all-reduced) or FSDP2 (parameters sharded per block) for the trainable networks;
        the frozen teacher stays replicated."""
        self.routes: dict = {}
        self._full = None  # rank 0's unsharded copy of the sampling model under FSDP
        if self.parallel == "ddp":
            for name, module in trainable.items():
                if any(p.requires_grad for p in module.parameters()):
                    method = "denoise" if hasattr(type(module), "denoise") else "forward"
                    self.routes[name] = distributed.wrap_ddp(module, self.device, method)
        elif self.parallel == "fsdp":
            tr = self.cfg.train
            if self.main:
                self._full = copy.deepcopy(self.ema if self.ema is not None else self.student)
            bf16 = self.device.type == "cuda" and tr.precision in ("auto", "bf16")
            for module in [*trainable.values(), *([self.ema] if self.ema is not None else [])]:
                distributed.shard(module, self.device, bf16, tr.fsdp_offload)

    # -- state ----------------------------------------------------------------------------------------
    def _weights(self) -> dict:
        out = {}
        for name, module in self.networks.trainable.items():
            out.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        if self.ema is not None:
            out.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        return out

    def _sharded_modules(self) -> dict:
        modules = dict(self.networks.trainable)
        if self.ema is not None:
            modules["ema"] = self.ema
        return modules

    def save(self, iteration: int) -> str:
        if self.world > 1:
            return self._save_sharded(iteration)
        tensors, opt_state = {}, {}
        for name, opt in self.optimizers.items():
            t, s = ckpt.flatten_optimizer(f"opt.{name}", opt.state_dict())
            tensors.update(t)
            opt_state[name] = s
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda{i}"] = s
        state = {"step": iteration, "optimizers": opt_state, "spec": attrs.asdict(self.spec)}
        path = self.store.save(iteration, self._weights(), tensors, state)
        for cb in self.callbacks:
            getattr(cb, "on_checkpoint", lambda *a: None)(self, path)
        return path

    def _save_sharded(self, iteration: int) -> str:
        """Collective: torch.distributed.checkpoint shards plus this rank's RNG (docs/distributed.md)."""
        rng = {"rng.cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        state = {"step": iteration, "spec": attrs.asdict(self.spec), "world_size": self.world,
                 "rng": self.cfg.train.rng}
        path = self.store.save_sharded(iteration, self._sharded_modules(), self.optimizers, rng, state,
                                       self.rank, self.main)
        if self.main:
            for cb in self.callbacks:
                getattr(cb, "on_checkpoint", lambda *a: None)(self, path)
        return path

    def _restore_rng(self, cpu: torch.Tensor, cuda: torch.Tensor | None, own: bool, step: int) -> None:
        """Shared stream: every rank takes the saved one. Per-rank streams: a rank the checkpoint did not
        have (resumed on more ranks) starts a fresh stream derived from (seed, rank, step)."""
        if self.cfg.train.rng == "per-rank" and not own:
            set_seed(distributed.rank_seed(self.cfg.seed + step, self.rank))
            self.log(f"fewstep: rank {self.rank} had no saved RNG stream; seeded a new one")
            return
        torch.set_rng_state(cpu)
        if cuda is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(cuda, self.device)

    def restore(self) -> int:
        latest = self.store.latest()
        if latest is not None and latest.get("format") == "dcp":
            rng, state = self.store.load_sharded(self._sharded_modules(), self.optimizers, self.rank)
            step = int(state["step"])
            self._restore_rng(rng["rng.cpu"], rng.get("rng.cuda"), state["rng_rank"] == self.rank, step)
            return step
        if latest is not None and self.parallel == "fsdp":
            raise UsageError(f"out={self.out} holds a single-process checkpoint; resume it once with "
                             "train.parallel=ddp (or in one process), then switch to fsdp")
        loaded = self.store.load(self.device)
        if loaded is None:
            return 0
        weights, tensors, state = loaded
        d = ckpt.join(self.store.root, self.store.latest()["dir"])
        ckpt.load_modules(self._sharded_modules(), weights, ckpt.join(d, "weights.safetensors"))
        ckpt.load_optimizers(self.optimizers, state, tensors, ckpt.join(d, "state.json"))
        if self.world > 1:
            idx = self.device.index or 0
            self._restore_rng(tensors["rng.cpu"], tensors.get(f"rng.cuda{idx}"), self.rank == 0, int(state["step"]))
            return int(state["step"])
        torch.set_rng_state(tensors["rng.cpu"])
        if torch.cuda.is_available() and "rng.cuda0" in tensors:
            torch.cuda.set_rng_state_all([tensors[f"rng.cuda{i}"] for i in range(torch.cuda.device_count())
                                          if f"rng.cuda{i}" in tensors])
        return int(state["step"])

    # -- evaluation -----------------------------------------------------------------------------------
    def sampling_model(self):
        if self._full is not None:
            return self._full
        return self.ema if self.ema is not None else self.student

    def _gather_full(self) -> None:
        """Collective under FSDP: rank 0's unsharded copy of the sampling model gets the current weights."""
        if self.parallel != "fsdp":
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        model = self.ema if self.ema is not None else self.student
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.main:
            self._full.load_state_dict(full)

    @torch.no_grad()
    def evaluate(self, n: int | None = None, seed: int = 1234) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
        """Sample the student (own RNG stream, so training stays reproducible) and score it."""
        from core.metrics import gmm_report

        n = n or self.cfg.train.eval_samples
        if not self.exact:  # nothing to score against: a preview grid is all we need (SDXL images are costly)
            n = min(n, getattr(self.teacher, "preview_samples", 16))
        # own stream on every device, so rank 0's evaluation leaves the shared training stream untouched
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            raw = self.networks.dataset.sample(n)["cond"] if self.networks.dataset is not None else None
            cond = self.teacher.encode_condition(raw) if raw is not None else None
            samples = generate(self.sampling_model(), self.spec, n, cond, self.registry, self.device,
                               shape=self.teacher.data_shape)
            samples = self.teacher.to_data_space(samples)
            if not self.exact:
                return {}, samples, None
            labels = cond if getattr(self.teacher, "num_classes", 0) else None
            reference = self.teacher.sample_exact(n, labels)
        return gmm_report(self.teacher, samples.float(), reference), samples, reference

    def write_preview(self, samples, reference) -> str:
        from core.preview import preview_png

        url = ckpt.join(self.out, "preview.png")
        ckpt.write_bytes_atomic(url, preview_png(samples, reference))
        return url

    # -- the loop -------------------------------------------------------------------------------------
    def _write_run_files(self) -> None:
        self.fs.makedirs(self.out_path, exist_ok=True)
        cfg_url = ckpt.join(self.out, "config.yaml")
        text = yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
        ckpt.write_bytes_atomic(cfg_url, text.encode())
        t = self.teacher
        meta = {"sampling": attrs.asdict(self.spec), "data_shape": list(t.data_shape),
                "num_classes": getattr(t, "num_classes", 0), "schedule": self.student.schedule.config()}
        ckpt.write_json(ckpt.join(self.out, "meta.json"), meta)

    def _trim_metrics(self, step: int) -> None:
        url = ckpt.join(self.out, "metrics.jsonl")
        if not ckpt.exists(url):
            return
        with fsspec.open(url, "r") as f:
            keep = [line for line in f if _logged_step(line) <= step]
        ckpt.write_bytes_atomic(url, "".join(keep).encode())

    def _log_metrics(self, record: dict) -> None:
        url = ckpt.join(self.out, "metrics.jsonl")
        with fsspec.open(url, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def train(self) -> dict:
        """Holds the run-directory lock (rank 0) around the whole run (core/lock.py)."""
        lock, error = None, None
        if self.main:
            try:
                lock = RunLock(self.out, self.log).acquire()
            except UsageError as exc:
                error = exc
        message = distributed.broadcast_object(None if error is None else str(error))
        if message:
            raise error if error is not None else RunLockedError(message)
        try:
            return self._train()
        finally:
            if lock is not None:
                lock.release()

    def _train(self) -> dict:
        self.build()
        start = self.restore()
        total = self.cfg.train.steps
        main = self.main
        if start:
            self.log(f"fewstep: {self.out} is complete (step {start}); raise train.steps to train on"
                     if start >= total else f"fewstep: resuming {self.out} from step {start}")
        self.tb = None
        if main:
            self._trim_metrics(start)  # also without a checkpoint: a run killed before its first one
            self._write_run_files()
            if self.out_path == self.out and os.environ.get("FEWSTEP_TENSORBOARD", "1") != "0":
                with contextlib.suppress(Exception):
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(os.path.join(self.out, "tb"))
        callbacks = self.callbacks if main else []
        for cb in callbacks:
            getattr(cb, "on_start", lambda *a: None)(self)
        tr = self.cfg.train
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        bar = tqdm(total=total, initial=start, disable=not (tr.progress and main), dynamic_ncols=True,
                   file=sys.stderr, desc=f"{self.cfg.objective.name}/{self.cfg.teacher.name}")
        t0 = time.perf_counter()
        last_eval: dict = {}
        for it in range(start, total):
            ctxs = [Context(self.nets, batch, it, self.micro, self.device) for batch in self._micro_batches()]
            for phase in self.phases:
                if it % phase.every != phase.offset:
                    continue
                metrics = self._run_phase(phase, ctxs, it, total)
                for k, v in metrics.items():
                    key = f"{phase.name}/{k}"
                    sums[key] = sums.get(key, 0) + _scalar(v)
                    counts[key] = counts.get(key, 0) + 1
            step = it + 1
            bar.update(1)
            if step % tr.log_every == 0 or step == total:
                means = distributed.all_mean({k: float(sums[k]) / counts[k] for k in sums})
                record = {"step": step, **means, "time": round(time.perf_counter() - t0, 3)}
                if tr.eval_every and self.exact and (step % tr.eval_every == 0 or step == total):
                    self._gather_full()
                    if main:
                        last_eval, _, _ = self.evaluate()
                        record.update({f"eval/{k}": v for k, v in last_eval.items()})
                if main:
                    self._log_metrics(record)
                    bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in record.items()
                                     if k not in ("step", "time") and isinstance(v, float)}, refresh=False)
                for cb in callbacks:
                    getattr(cb, "on_log", lambda *a: None)(self, record)
                sums, counts = {}, {}
            if tr.preview_every and step % tr.preview_every == 0 and step != total:
                self._gather_full()
                if main:
                    _, samples, reference = self.evaluate(min(tr.eval_samples, 2000))
                    self.write_preview(samples, reference)
            if step % tr.ckpt_every == 0 or step == total:
                self.save(step)
        bar.close()
        metrics, preview, export = {}, None, None
        self._gather_full()
        if main:
            metrics, samples, reference = self.evaluate()
            preview = self.write_preview(samples, reference)
            export = self.export()
        for cb in callbacks:
            getattr(cb, "on_end", lambda *a: None)(self)
        if self.tb is not None:
            self.tb.close()
        distributed.barrier()  # rank 0's files are complete before any rank returns
        latest = self.store.latest()
        if self._owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
        return {"out": self.out, "preview": preview, "checkpoint": latest, "export": export,
                "metrics": metrics, "start": start, "rank": self.rank}

    # -- the global batch, split over ranks and micro-batches ----------------------------------------
    def _draws(self, index: int):
        """Inside, per-sample draws come from the global batch's shared stream (core.distributed.SliceDraws)."""
        if not self.sliced:
            return contextlib.nullcontext()
        return distributed.SliceDraws(self.micro, self.total_batch, index, warn=self.log)

    def _micro_batches(self) -> list[dict]:
        """This rank's ``grad_accum`` micro-batches. Shared stream: every rank draws the whole global batch
        (as one process would) and keeps rows [index*micro, (index+1)*micro) with index = rank*A + j."""
        tr, ds = self.cfg.train, self.networks.dataset
        A, m = tr.grad_accum, self.micro
        shared = tr.rng == "shared"
        raw = ds.sample(self.total_batch if shared else m * A) if ds is not None else {"x": None, "cond": None}
        first = self.rank * A if shared else 0
        whole = self.total_batch == m  # one process, one micro-batch: nothing to split
        start = distributed.rng_state(self.device) if self.replay else None
        batches = []
        for j in range(A):
            x, c = raw.get("x"), raw.get("cond")
            if not whole:
                x, c = _rows((x, c), (first + j) * m, m)
            if start is not None:
                distributed.set_rng_state(start, self.device)  # each micro-batch replays the global draw
            with self._draws(first + j):  # a VAE encoder's sampling is per-sample randomness too
                batches.append({"x": None if x is None else self.teacher.to_model_space(x.to(self.device)),
                                "cond": None if c is None else self.teacher.encode_condition(c)})
        return batches

    def _run_phase(self, phase: Phase, ctxs: list[Context], it: int, total: int) -> dict:
        tr = self.cfg.train
        for name, params in self.params.items():
            flag = name in phase.trains
            for p in params:
                p.requires_grad_(flag)
        for name, route in self.routes.items():
            route.active = name in phase.trains
        opt = self.optimizers[phase.name]
        factor = lr_factor(it, tr.warmup, total, tr.lr_decay)
        for group in opt.param_groups:
            group["lr"] = self.base_lr[phase.name] * factor
        metrics: dict = {}
        clip = phase.grad_clip if phase.grad_clip is not None else tr.grad_clip
        A = len(ctxs)
        for r in range(phase.repeats):
            opt.zero_grad(set_to_none=True)
            for route in self.routes.values():
                route.calls = 0
            # micro-batches replay the phase's draws so they match one global-batch call (docs/distributed.md)
            start = distributed.rng_state(self.device) if self.replay else None
            stepped, parts = False, []
            for j, ctx in enumerate(ctxs):
                ctx.repeat = r
                if start is not None:
                    distributed.set_rng_state(start, self.device)
                with self._grad_sync(phase, j == A - 1):
                    with self._draws(self.rank * A + j), \
                            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                        loss, metrics = self.objective.loss(phase.name, ctx)
                    if loss.requires_grad:
                        (loss / A if A > 1 else loss).backward()
                        stepped = True
                parts.append({"loss": loss, **metrics})
            metrics = parts[0] if A == 1 else {k: sum(_scalar(p[k]) for p in parts if k in p) / A for k in parts[0]}
            if stepped:
                for name in phase.trains:  # a trained net no DDP forward reached: average its grads by hand
                    if name in self.routes and self.routes[name].calls == 0:
                        distributed.average_gradients(self.params[name])
                params = [p for group in opt.param_groups for p in group["params"]]
                if clip:
                    norm = torch.nn.utils.clip_grad_norm_(params, clip)
                    metrics = {**metrics, "grad_norm": norm}
                opt.step()
        # zero every grad so terms that reached other networks (e.g. GAN into the critic) don't leak
        for module in self.networks.trainable.values():
            module.zero_grad(set_to_none=True)
        if self.ema is not None and "student" in phase.trains:
            with torch.no_grad():
                ema_p, p = list(self.ema.parameters()), list(self.student.parameters())
                torch._foreach_lerp_(ema_p, p, 1 - tr.ema)
        return metrics

    def _grad_sync(self, phase: Phase, last: bool):
        """Gradients are averaged over ranks on the last micro-batch only (accumulated locally before)."""
        stack = contextlib.ExitStack()
        if last:
            return stack
        for name in phase.trains:
            if name in self.routes:
                stack.enter_context(self.routes[name].ddp.no_sync())
            elif self.parallel == "fsdp":
                module = self.nets[name]
                module.set_requires_gradient_sync(False)
                stack.callback(module.set_requires_gradient_sync, True)
        return stack

    # -- export ---------------------------------------------------------------------------------------
    def export(self) -> str:
        """The student (EMA when on) as ``RUN/student.safetensors``; plugins may add richer exports."""
        url = ckpt.join(self.out, "student.safetensors")
        ckpt.save_tensors(url, self.sampling_model().state_dict())
        for owner in (self.teacher, self.objective):  # e.g. a diffusers pipeline folder, then method extras
            exporter = getattr(owner, "export", None)
            if exporter is not None:
                exporter(self.sampling_model(), self.spec, self.out)
        return url


def _rows(obj, start: int, n: int):
    """Rows [start, start+n) of a batch: tensors, lists and tuples of them, dicts (e.g. SDXL conditions)."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return {k: _rows(v, start, n) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_rows(v, start, n) for v in obj)
    return obj[start:start + n]


def _logged_step(line: str) -> float:
    """The step of one metrics.jsonl line; a half-written line (a kill mid-write) counts as never logged."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else math.inf
    except (ValueError, KeyError, TypeError):
        return math.inf


def _scalar(v):
    """A logged metric as a float tensor (or float); a DTensor (FSDP grad norm) as its full value."""
    if hasattr(v, "full_tensor"):
        v = v.full_tensor()
    return v.detach().float() if torch.is_tensor(v) else float(v)


def load_run(run_dir: str, registry: Registry | None = None, device="cpu"):
    """(networks, spec, config) of a finished or running run; the student holds the exported weights
    (or the latest checkpoint's student/EMA when the run has not finished)."""
    from core.runconfig import resolve

    run_dir = run_dir.rstrip("/")
    cfg_url = ckpt.join(run_dir, "config.yaml")
    if not ckpt.exists(cfg_url):
        raise UsageError(f"run={run_dir} is not a fewstep run (no config.yaml); pass the out= dir of a training run")
    tree = ckpt.read_yaml(cfg_url, fix=RUN_DIR_FIX)
    if not isinstance(tree, dict):
        raise RunDirError(f"{cfg_url} holds no run config ({type(tree).__name__}); {RUN_DIR_FIX}")
    cfg = resolve(tree, registry)
    meta = ckpt.read_json(ckpt.join(run_dir, "meta.json"), fix=RUN_DIR_FIX)
    if not isinstance(meta, dict) or not isinstance(meta.get("sampling"), dict):
        raise RunDirError(f"{ckpt.join(run_dir, 'meta.json')} lacks the sampling spec; {RUN_DIR_FIX}")
    networks = Networks(cfg, registry, device, with_critic=False)
    student_url = ckpt.join(run_dir, "student.safetensors")
    if ckpt.exists(student_url):
        weights = ckpt.load_tensors(student_url, device, fix=RUN_DIR_FIX)
        ckpt.load_modules({"student": networks.student}, {f"student.{k}": v for k, v in weights.items()}, student_url)
    else:
        store = ckpt.CheckpointStore(run_dir)
        latest = store.latest()
        if latest is None:
            raise UsageError(f"run={run_dir} has no checkpoint yet; wait for its first checkpoint")
        if latest.get("format") == "dcp":
            ckpt.load_sharded_module(ckpt.join(store.root, latest["dir"], "dcp"), networks.student,
                                     ["ema", "student"])
        else:
            weights = store.load(device)[0]
            prefix = "ema." if any(k.startswith("ema.") for k in weights) else "student."
            ckpt.load_modules({"student": networks.student}, {"student." + k[len(prefix):]: v for k, v in weights.items()
                                                              if k.startswith(prefix)},
                              ckpt.join(store.root, latest["dir"], "weights.safetensors"))
    networks.student.requires_grad_(False).eval()
    try:
        spec = SamplingSpec(**meta["sampling"])
    except TypeError as exc:
        raise RunDirError(f"{ckpt.join(run_dir, 'meta.json')}: bad sampling spec ({exc}); {RUN_DIR_FIX}") from None
    return networks, spec, cfg
