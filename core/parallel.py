"""How one run spreads over processes and micro-batches (docs/distributed.md).

Under torchrun every rank runs the loop on its rows of the global batch, split further into
``train.grad_accum`` micro-batches; DDP or FSDP2 averages the gradients, so one optimizer step sees the whole
global batch. In a single process with one micro-batch every method here is a no-op or a pass-through.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from core import distributed
from core.errors import UsageError


class Parallel:
    """Ranks, the parallel mode, micro-batch sizes, the wrapped networks and the shared random stream."""

    def __init__(self, cfg, device: torch.device, log):
        self.cfg = cfg
        self.owns_group = distributed.init_from_env(device.type)
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.main = self.rank == 0
        if self.world > 1 and device.type == "cuda":
            device = torch.device("cuda", distributed.local_rank())
            torch.cuda.set_device(device)
        self.device = device
        self.log = log if self.main else (lambda msg: None)
        distributed.check_agreement(cfg.to_dict())
        self.mode = self._mode()
        self.micro, self.total_batch = self._batch_sizes()
        tr = cfg.train
        # one shared stream sliced per micro-batch (docs/distributed.md); off for a plain 1-process run
        self.sliced = tr.rng == "shared" and self.total_batch > self.micro
        self.replay = self.sliced and tr.grad_accum > 1
        self.routes: dict = {}  # DDP wrappers of the trainable networks, by role
        self.full = None  # rank 0's unsharded copy of the sampling model under FSDP

    def _mode(self) -> str:
        tr = self.cfg.train
        if self.world == 1:
            if tr.parallel not in ("none", "auto"):
                self.log(f"fewstep: train.parallel={tr.parallel} in a single process (not under torchrun); "
                         "training without it")
            return "none"
        if tr.parallel == "auto":  # launched on several ranks: they share gradients
            return "ddp"
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

    # -- wrapping -----------------------------------------------------------------------------------
    def wrap(self, trainable: dict, ema, student) -> None:
        """DDP (gradients all-reduced) or FSDP2 (parameters sharded per block) for the trainable networks;
        the frozen teacher stays replicated."""
        if self.mode == "ddp":
            for name, module in trainable.items():
                if any(p.requires_grad for p in module.parameters()):
                    method = "denoise" if hasattr(type(module), "denoise") else "forward"
                    self.routes[name] = distributed.wrap_ddp(module, self.device, method)
        elif self.mode == "fsdp":
            tr = self.cfg.train
            if self.main:
                self.full = copy.deepcopy(ema if ema is not None else student)
            bf16 = self.device.type == "cuda" and tr.precision in ("auto", "bf16")
            for module in [*trainable.values(), *([ema] if ema is not None else [])]:
                distributed.shard(module, self.device, bf16, tr.fsdp_offload)

    def gather_full(self, model) -> None:
        """Collective under FSDP: rank 0's unsharded copy of the sampling model gets ``model``'s weights."""
        if self.mode != "fsdp":
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.main:
            self.full.load_state_dict(full)

    # -- one phase's gradients ---------------------------------------------------------------------------
    def train_only(self, trains: tuple, params: dict) -> None:
        """Gradients on exactly the networks a phase trains (and their DDP routes active)."""
        for name, ps in params.items():
            flag = name in trains
            for p in ps:
                p.requires_grad_(flag)
        for name, route in self.routes.items():
            route.active = name in trains

    def grad_sync(self, trains: tuple, nets: dict, last: bool):
        """Gradients are averaged over ranks on the last micro-batch only (accumulated locally before)."""
        stack = contextlib.ExitStack()
        if last:
            return stack
        for name in trains:
            if name in self.routes:
                stack.enter_context(self.routes[name].ddp.no_sync())
            elif self.mode == "fsdp":
                module = nets[name]
                module.set_requires_gradient_sync(False)
                stack.callback(module.set_requires_gradient_sync, True)
        return stack

    def average_unreached(self, trains: tuple, params: dict) -> None:
        """A trained net no DDP forward reached: average its gradients by hand."""
        for name in trains:
            if name in self.routes and self.routes[name].calls == 0:
                distributed.average_gradients(params[name])

    # -- the global batch, split over ranks and micro-batches ----------------------------------------
    def draws(self, index: int):
        """Inside, per-sample draws come from the global batch's shared stream (core.distributed.SliceDraws)."""
        if not self.sliced:
            return contextlib.nullcontext()
        return distributed.SliceDraws(self.micro, self.total_batch, index, warn=self.log)

    def micro_batches(self, dataset, teacher) -> list[dict]:
        """This rank's ``grad_accum`` micro-batches. Shared stream: every rank draws the whole global batch
        (as one process would) and keeps rows [index*micro, (index+1)*micro) with index = rank*A + j."""
        tr = self.cfg.train
        A, m = tr.grad_accum, self.micro
        shared = tr.rng == "shared"
        raw = dataset.sample(self.total_batch if shared else m * A) if dataset is not None else {"x": None, "cond": None}
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
            with self.draws(first + j):  # a VAE encoder's sampling is per-sample randomness too
                batches.append({"x": None if x is None else teacher.to_model_space(x.to(self.device)),
                                "cond": None if c is None else teacher.encode_condition(c)})
        return batches

    def begin_step(self):
        """Start one optimizer step; returns ``restart()``, called before each micro-batch so that its draws
        replay the step's, and the micro-batches together match one global-batch call."""
        for route in self.routes.values():
            route.calls = 0
        start = distributed.rng_state(self.device) if self.replay else None

        def restart():
            if start is not None:
                distributed.set_rng_state(start, self.device)
        return restart

    def close(self) -> None:
        distributed.barrier()  # rank 0's files are complete before any rank returns
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _rows(obj, start: int, n: int):
    """Rows [start, start+n) of a batch: tensors, lists and tuples of them, dicts (e.g. SDXL conditions)."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return {k: _rows(v, start, n) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_rows(v, start, n) for v in obj)
    return obj[start:start + n]
