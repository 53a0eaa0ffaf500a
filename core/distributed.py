"""Multi-process training on ``torch.distributed`` (launched by ``torchrun``): the process group,
rank helpers, broadcasts objectives call, the config-agreement check, DDP / FSDP2 wrapping and the
shared-stream random draws that make N ranks compute exactly what one process would.

Everything here is a no-op in a single process, so objectives may call the helpers unconditionally.
See docs/distributed.md.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from core.errors import UsageError


# -- process group and ranks -------------------------------------------------------------------------
def env_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when launched as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device_type: str) -> bool:
    """Join the process group torchrun describes (env:// rendezvous); True when this call created it.
    NCCL on CUDA, gloo on CPU. A group the caller already initialised is used as is."""
    if not dist.is_available() or dist.is_initialized() or env_world_size() <= 1:
        return False
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", rank()))


def is_main() -> bool:
    """True on the rank that logs, writes run files, previews and exports (rank 0)."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    # NCCL moves only CUDA tensors; gloo only CPU ones
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- broadcasts objectives call (same value on every rank) -------------------------------------------
def broadcast_object(value, src: int = 0):
    """``value`` as held by rank ``src``, on every rank (any picklable object)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank ``src``'s integer on every rank, e.g. DMD2's backward-simulation step index k, drawn
    once per iteration so the whole global batch uses the same k."""
    if not is_distributed():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_comm_device())
    dist.broadcast(t, src=src)
    return int(t.item())


def broadcast_float(value: float, src: int = 0) -> float:
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.broadcast(t, src=src)
    return float(t.item())


def broadcast_tensor(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s tensor (same shape and dtype on every rank), returned on ``t``'s device."""
    if not is_distributed():
        return t
    buf = t.detach().to(_comm_device()).contiguous().clone()
    dist.broadcast(buf, src=src)
    return buf.to(t.device)


def all_mean(values: dict[str, float]) -> dict[str, float]:
    """Mean over ranks of each scalar (same keys on every rank): logged metrics cover the global batch."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return dict(zip(keys, (t / world_size()).tolist()))


# -- config agreement -------------------------------------------------------------------------------
def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def check_agreement(tree: dict, what: str = "config") -> None:
    """Raise a UsageError on every rank when any rank's ``tree`` differs from rank 0's, naming the key."""
    if not is_distributed():
        return
    trees = [None] * world_size()
    dist.all_gather_object(trees, tree)
    ref = _flat(trees[0])
    for r, other in enumerate(trees[1:], start=1):
        flat = _flat(other)
        diff = sorted(k for k in set(ref) | set(flat) if ref.get(k) != flat.get(k))
        if diff:
            k = diff[0]
            raise UsageError(f"ranks disagree on the {what}: rank {r} has {k}={flat.get(k)!r}, rank 0 has "
                             f"{ref.get(k)!r}; launch every rank with the same arguments")


# -- wrapping trainable networks --------------------------------------------------------------------
class _MethodCall(torch.nn.Module):
    """Lets DDP run any method of a network as its forward (objectives call ``.denoise``)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, method: str, *args, **kwargs):
        return getattr(type(self.module), method)(self.module, *args, **kwargs)


class _Routed:
    """Instance attribute shadowing ``module.denoise``: through DDP while a phase trains the module
    (so its gradients are averaged over ranks), straight to the module otherwise."""

    def __init__(self, module: torch.nn.Module, ddp, method: str):
        self.module, self.ddp, self.method = module, ddp, method
        self.active, self.calls = False, 0

    def __call__(self, *args, **kwargs):
        if self.active:
            self.calls += 1
            return self.ddp(self.method, *args, **kwargs)
        return getattr(type(self.module), self.method)(self.module, *args, **kwargs)


def wrap_ddp(module: torch.nn.Module, device: torch.device, method: str = "denoise") -> _Routed:
    """DistributedDataParallel around ``module`` (parameters broadcast from rank 0 now, gradients
    all-reduced in buckets during backward); ``module.<method>`` (and so ``module(...)`` for a
    denoiser whose forward calls it) routes through it."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    ddp = DDP(_MethodCall(module), device_ids=ids, broadcast_buffers=False)
    routed = _Routed(module, ddp, method)
    module.__dict__[method] = routed
    return routed


def average_gradients(params) -> None:
    """All-reduce mean of ``params``' gradients, for a trained network no DDP forward reached
    (an objective that called it through some other method)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not is_distributed():
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """FSDP2 wrapping units: every child of every ``nn.ModuleList`` (transformer / residual blocks)."""
    return [m for sub in module.modules() if isinstance(sub, torch.nn.ModuleList) for m in sub]


def shard(module: torch.nn.Module, device: torch.device, bf16: bool, offload: bool) -> torch.nn.Module:
    """FSDP2 ``fully_shard`` per block, then the root; ``denoise`` becomes an FSDP forward method."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard,
                                        register_fsdp_forward_method)

    mesh = init_device_mesh(device.type, (world_size(),))
    kw = {"mesh": mesh}
    if bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for block in blocks(module):
        fully_shard(block, **kw)
    fully_shard(module, **kw)
    if hasattr(type(module), "denoise"):
        register_fsdp_forward_method(module, "denoise")
    return module


# -- one random stream for the global batch --------------------------------------------------------
_SIZED = {torch.randn, torch.rand}
_LIKE = {torch.randn_like, torch.rand_like, torch.randint_like}
_INPLACE = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.random_, torch.Tensor.exponential_,
            torch.Tensor.bernoulli_, torch.Tensor.cauchy_, torch.Tensor.log_normal_, torch.Tensor.geometric_}
_UNSLICED = {torch.multinomial, torch.bernoulli, torch.normal, torch.poisson, torch.nn.functional.dropout}


class SliceDraws(TorchFunctionMode):
    """Per-sample random draws for the whole global batch, keeping this micro-batch's rows.

    Inside it, a draw whose leading dimension equals the micro-batch size ``local`` (``torch.randn(b, ..)``,
    ``randn_like(x)``, ``x.normal_()``, ``randint(lo, hi, (b,))``...) is made for ``total`` rows from the
    shared stream and rows ``[index*local, (index+1)*local)`` are returned. Every rank thus consumes the
    stream exactly like one process drawing the global batch, and gets the same numbers for its rows.
    Other draws (shape ``()``, per-iteration choices) are made whole: the same value on every rank.
    """

    def __init__(self, local: int, total: int, index: int, warn=None):
        super().__init__()
        self.local, self.total, self.index, self.warn = local, total, index, warn

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.index * self.local:(self.index + 1) * self.local]

    def _per_sample(self, shape) -> bool:
        return len(shape) >= 1 and shape[0] == self.local

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _SIZED or func is torch.randint:
            size, put = _size_arg(func, args, kwargs)
            if size is not None and self._per_sample(size):
                rg = kwargs.pop("requires_grad", False)
                out = func(*put((self.total, *size[1:])), **kwargs)
                return self._rows(out).clone().requires_grad_(rg)
        elif func in _LIKE and self._per_sample(args[0].shape):
            x = args[0]
            big = torch.empty((self.total, *x.shape[1:]), dtype=kwargs.pop("dtype", x.dtype),
                              device=kwargs.pop("device", x.device))
            kwargs.pop("memory_format", None)
            return self._rows(func(big, *args[1:], **kwargs)).clone()
        elif func in _INPLACE and self._per_sample(args[0].shape):
            x = args[0]
            big = torch.empty((self.total, *x.shape[1:]), dtype=x.dtype, device=x.device)
            func(big, *args[1:], **kwargs)
            with torch.no_grad():
                x.copy_(self._rows(big))
            return x
        elif func in _UNSLICED and self.warn is not None and args and torch.is_tensor(args[0]) \
                and self._per_sample(args[0].shape):
            self.warn(f"fewstep: {getattr(func, '__name__', func)} on a per-sample tensor is not sliced from the "
                      "global draw; ranks share its random numbers (use train.rng=per-rank for independent draws)")
            self.warn = None
        return func(*args, **kwargs)


def _size_arg(func, args, kwargs):
    """(size, rebuild) of a ``randn/rand/randint`` call: the requested shape and a function that
    returns the positional args with another shape."""
    if "size" in kwargs:
        size = tuple(kwargs["size"])

        def put(new):
            kwargs["size"] = new
            return args
        return size, put
    if func is torch.randint:
        i = next((i for i, a in enumerate(args) if isinstance(a, (tuple, list, torch.Size))), None)
        if i is None:
            return None, None
        return tuple(args[i]), lambda new: (*args[:i], new, *args[i + 1:])
    if args and isinstance(args[0], (tuple, list, torch.Size)):
        return tuple(args[0]), lambda new: (new, *args[1:])
    n = 0
    while n < len(args) and isinstance(args[n], int):
        n += 1
    return tuple(args[:n]), lambda new: (*new, *args[n:])


def rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def rank_seed(seed: int, r: int) -> int:
    """Seed of rank ``r``'s own stream under ``train.rng=per-rank`` (rank 0 keeps ``seed``)."""
    return (seed + 0x9E3779B97F4A7C15 * r) % (2**63)

