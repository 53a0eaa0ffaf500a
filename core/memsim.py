"""Memory of a forward/backward without running it: networks on fake tensors (torch's FakeTensorMode: shapes,
dtypes and devices, no storage), and a dispatch mode that counts the bytes of every storage an op creates and
frees them when torch drops the storage. Its peak is what the caching allocator would be asked for at most,
before fragmentation and kernel workspaces (cuBLAS, flash attention), which it does not see."""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def fake_mode() -> FakeTensorMode:
    """Networks built inside it hold fake parameters; real tensors (schedules' tables) mix in freely."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class LiveBytes(TorchDispatchMode):
    """Counts the storages created while active: ``now`` bytes alive, ``peak`` the most alive at once.

    A storage is new when no input of the op shares it (views and in-place ops create none); it stops counting
    when torch frees it. Storages that existed before (weights, inputs) never count."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self.live:
                continue
            self.live[key] = storage.nbytes()
            self.now += self.live[key]
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key)
        return out


@contextlib.contextmanager
def counting():
    """``with counting() as live: ...`` then ``live.peak``: the most bytes the block held at once."""
    live = LiveBytes()
    with live:
        yield live
