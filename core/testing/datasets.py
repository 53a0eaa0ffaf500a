"""Dataset: {"x", "cond"} rows in data space, reproducible from torch's global RNG."""

from __future__ import annotations

import torch

from ._report import Report, fail
from ._setup import Setup


def check_dataset(setup: Setup, rep: Report) -> None:
    ds, t = setup.dataset, setup.teacher
    if ds is None:
        fail("the run built no dataset", "set data=NAME in conformance_config")

    def draw():
        if not callable(getattr(ds, "sample", None)):
            fail("dataset has no sample(n)", "define sample(n) -> {'x': Tensor | None, 'cond': raw | None}")
        torch.manual_seed(7)
        a = ds.sample(8)
        torch.manual_seed(7)
        b = ds.sample(8)
        if not isinstance(a, dict) or not {"x", "cond"} <= set(a):
            fail(f"sample(n) returned {type(a).__name__}{sorted(a) if isinstance(a, dict) else ''}",
                 "return a dict with keys 'x' and 'cond' (None when absent)")
        if a["x"] is None and a["cond"] is None:
            fail("sample(n) returned neither x nor cond", "return real data 'x' and/or conditions 'cond'")
        if a["x"] is not None:
            x = a["x"]
            if not torch.is_tensor(x) or x.shape[0] != 8 or not x.is_floating_point():
                fail(f"sample(8)['x'] is {type(x).__name__} {tuple(getattr(x, 'shape', ()))}",
                     "return a floating tensor with n rows, in data space")
            z = t.to_model_space(x.to(setup.device))
            if tuple(z.shape) != (8, *t.data_shape):
                fail(f"to_model_space(sample(8)['x']) has shape {tuple(z.shape)}, the teacher wants (8, *{t.data_shape})",
                     "return rows of the teacher's data (in data space)")
            if not torch.equal(a["x"], b["x"]):
                fail("sample(n) differs under the same torch.manual_seed", "draw randomness from torch's global RNG "
                     "(torch.randint, torch.randn...) so resumed runs see the same data")
        if a["cond"] is not None:
            if len(a["cond"]) != 8:
                fail(f"sample(8)['cond'] has {len(a['cond'])} rows", "return one condition per row")
            t.encode_condition(a["cond"])
            same = torch.equal(a["cond"], b["cond"]) if torch.is_tensor(a["cond"]) else a["cond"] == b["cond"]
            if not same:
                fail("sample(n)['cond'] differs under the same torch.manual_seed", "draw from torch's global RNG")

    rep.run("sample", draw)
