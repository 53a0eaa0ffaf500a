"""Multi-process training (docs/distributed.md): 2 CPU ranks on gloo, spawned once per test module.

The ranks run every multi-rank job in one spawn (process start-up dominates the cost); the parent then
compares their results with single-process runs: DDP (and FSDP2) training equals one process with the same
global batch, a 2-rank checkpoint resumes on 1 rank exactly, broadcasts agree, bad configs fail clearly.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import pytest
import torch

from conftest import run_config

WORLD = 2
BASE = ("objective=denoise", "teacher=gmm", "teacher.preset=cls4", "student.hidden=32", "student.depth=2",
        "student.emb_dim=16", "train.batch=64", "train.steps=6", "train.ckpt_every=3", "train.keep=5",
        "train.eval_every=0", "train.preview_every=0", "train.eval_samples=64", "train.log_every=3", "seed=3")


# 2-step generator: backward simulation draws its step index k once per iteration
DMD2 = ("objective=dmd2", "teacher=gmm", "teacher.preset=ring8", "student.hidden=32", "student.depth=2",
        "student.emb_dim=16", "objective.critic_updates=2", "objective.steps=2", "train.batch=32", "train.steps=4",
        "train.ckpt_every=4", "train.eval_every=0", "train.preview_every=0", "train.eval_samples=64", "train.log_every=2", "seed=5")


pytestmark = pytest.mark.usefixtures("one_thread")


def _student(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.sampling_model().state_dict().items()}


def _train(*overrides) -> tuple[dict, dict]:
    from core.runner import Trainer

    trainer = Trainer(run_config(*overrides))
    result = trainer.train()
    return _student(trainer), result


# -- the ranks' jobs (run inside the spawned processes) -----------------------------------------------
def _job_broadcast(rank, tmp):
    from core import distributed as d

    return {"int": d.broadcast_int(100 + rank), "float": d.broadcast_float(0.5 + rank),
            "object": d.broadcast_object({"k": [rank, "x"]}),
            "tensor": d.broadcast_tensor(torch.full((3,), rank + 1.0)), "mean": d.all_mean({"a": float(rank), "b": 2.0 * rank}), "rank": d.rank(), "world": d.world_size()}


def _job_ddp(rank, tmp):
    weights, result = _train(*BASE, "train.parallel=ddp", f"out={tmp}/ddp")
    return {"weights": weights, "metrics": result["metrics"], "latest": result["checkpoint"], "draw": torch.rand(3)}


def _job_per_rank(rank, tmp):
    """Own stream per rank: a 2-rank run stopped at step 3 and resumed on 2 ranks vs an uninterrupted one."""
    args = (*BASE, "train.parallel=ddp", "train.rng=per-rank")
    _train(*args, "train.steps=3", f"out={tmp}/per-rank")
    resumed, _ = _train(*args, f"out={tmp}/per-rank")
    straight, _ = _train(*args, f"out={tmp}/per-rank-straight")
    return {"resumed": resumed, "straight": straight, "draw": torch.rand(3)}


def _job_ddp_accum(rank, tmp):
    return {"weights": _train(*BASE, "train.parallel=ddp", "train.grad_accum=2", f"out={tmp}/accum")[0]}


def _job_ddp_half(rank, tmp):
    """A 2-rank run stopped at step 3 (its checkpoint is resumed by the parent on one rank)."""
    _train(*BASE, "train.parallel=ddp", "train.steps=3", f"out={tmp}/half")
    return {}


def _job_fsdp(rank, tmp):
    weights, _ = _train(*BASE, "train.parallel=fsdp", f"out={tmp}/fsdp")
    _train(*BASE, "train.parallel=fsdp", "train.steps=3", "train.ema=0.9", f"out={tmp}/fsdp-half")
    return {"weights": weights}


def _job_dmd2(rank, tmp):
    return {"weights": _train(*DMD2, "train.parallel=ddp", f"out={tmp}/dmd2")[0]}


def _job_disagree(rank, tmp):
    from core.errors import UsageError
    from core.runner import Trainer

    try:
        Trainer(run_config(*BASE, "train.parallel=ddp", f"train.lr={1e-3 * (rank + 1)}", f"out={tmp}/bad"))
    except UsageError as exc:
        return {"error": str(exc)}
    return {"error": None}


def _job_no_parallel(rank, tmp):
    from core.errors import UsageError
    from core.runner import Trainer

    try:
        Trainer(run_config(*BASE, "train.parallel=none", f"out={tmp}/none"))
    except UsageError as exc:
        return {"error": str(exc)}
    return {"error": None}


def _job_auto(rank, tmp):
    """No train.parallel under torchrun: the default (auto) trains with DDP."""
    return {"weights": _train(*BASE, f"out={tmp}/auto")[0]}


JOBS = [_job_broadcast, _job_disagree, _job_no_parallel, _job_auto, _job_ddp, _job_ddp_accum, _job_ddp_half, _job_fsdp,
        _job_dmd2, _job_per_rank]


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), FEWSTEP_TENSORBOARD="0")
    torch.set_num_threads(1)
    import torch.distributed as dist

    # one group for every job (as torchrun's env would give each Trainer); a hang fails after the timeout
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    out = {}
    for job in JOBS:
        t0 = time.perf_counter()
        try:
            out[job.__name__] = job(rank, tmp)
            out[job.__name__]["seconds"] = time.perf_counter() - t0
        except Exception:  # recorded, so the parent reports which job failed and how
            out[job.__name__] = {"failed": traceback.format_exc()}
        dist.barrier()
    dist.destroy_process_group()
    torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Results of every job on each of 2 gloo ranks, and the directory their runs wrote.

    Under pytest-xdist the first worker to get here spawns the ranks and the others reuse its results
    (a file lock in the session's shared temp dir), so the ranks run once per session."""
    import torch.multiprocessing as mp
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by every worker of this session
    tmp = root / "distributed-ranks"
    with FileLock(str(tmp) + ".lock"):
        if not all((tmp / f"rank{r}.pt").exists() for r in range(WORLD)):
            tmp.mkdir(exist_ok=True)
            ctx = mp.spawn(_worker, args=(WORLD, _free_port(), str(tmp)), nprocs=WORLD, join=False)
            deadline = time.monotonic() + 400
            while not ctx.join(timeout=2):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    pytest.fail("the 2-rank jobs did not finish in 400 s (a collective hung)")
    results = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return results, tmp


def _job(ranks, name, rank=None):
    results, _ = ranks
    outs = results if rank is None else [results[rank]]
    for r, out in enumerate(outs):
        if "failed" in out[name]:
            pytest.fail(f"{name} failed on rank {r}:\n{out[name]['failed']}")
    return [res[name] for res in results]


def _close(a: dict, b: dict, atol=1e-5, rtol=1e-4):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")


# -- tests ----------------------------------------------------------------------------------------------
def test_broadcasts_agree_across_ranks(ranks):
    r0, r1 = _job(ranks, "_job_broadcast")
    assert (r0["rank"], r1["rank"], r0["world"], r1["world"]) == (0, 1, 2, 2)
    for res in (r0, r1):  # rank 0's value everywhere, although each rank passed its own
        assert res["int"] == 100 and res["float"] == 0.5 and res["object"] == {"k": [0, "x"]}
        torch.testing.assert_close(res["tensor"], torch.ones(3))
        assert res["mean"] == {"a": 0.5, "b": 1.0}


def test_ddp_equals_one_process_with_the_global_batch(ranks, tmp_path):
    r0, r1 = _job(ranks, "_job_ddp")
    single, result = _train(*BASE, f"out={tmp_path}/single")
    _close(r0["weights"], r1["weights"], atol=0, rtol=0)  # replicas never drift apart
    _close(r0["weights"], single)
    # the trained weights moved (the comparison is not between two untouched initialisations)
    init = _student_at_init()
    assert max(float((single[k] - init[k]).abs().max()) for k in single) > 1e-3
    assert r1["metrics"] == {} and set(r0["metrics"]) == set(result["metrics"])


def _student_at_init() -> dict:
    from core.roles import Networks, set_seed

    cfg = run_config(*BASE)
    set_seed(cfg.seed)
    return {k: v.detach().clone() for k, v in Networks(cfg).student.state_dict().items()}


def test_per_rank_streams_resume_exactly(ranks):
    shared0, shared1 = _job(ranks, "_job_ddp")
    r0, r1 = _job(ranks, "_job_per_rank")
    torch.testing.assert_close(shared0["draw"], shared1["draw"], atol=0, rtol=0)  # shared: one stream
    assert not torch.equal(r0["draw"], r1["draw"])  # per-rank: each rank its own
    _close(r0["resumed"], r0["straight"], atol=0, rtol=0)
    _close(r0["resumed"], r1["resumed"], atol=0, rtol=0)
    # other data and noise than the shared-stream run (the streams really are the ranks' own)
    assert max(float((r0["straight"][k] - shared0["weights"][k]).abs().max()) for k in r0["straight"]) > 1e-4


def test_grad_accum_equals_one_process(ranks, tmp_path):
    r0, _ = _job(ranks, "_job_ddp_accum")  # 2 ranks x 2 micro-batches of 16
    single, _ = _train(*BASE, f"out={tmp_path}/single")
    accum1, _ = _train(*BASE, "train.grad_accum=4", f"out={tmp_path}/accum")  # 1 process x 4 micro-batches
    _close(r0["weights"], single)
    _close(accum1, single)


def test_two_rank_checkpoint_resumes_on_one_rank_exactly(ranks, tmp_path):
    _job(ranks, "_job_ddp_half")
    _, tmp = ranks
    half = tmp / "half"
    latest = __import__("json").loads((half / "checkpoints" / "latest.json").read_text())
    assert latest == {"step": 3, "dir": "step-00000003", "format": "dcp"}
    assert sorted(p.name for p in (half / "checkpoints" / "step-00000003").iterdir()) == \
        ["dcp", "rng-00000.safetensors", "rng-00001.safetensors", "state.json"]
    resumed, result = _train(*BASE, f"out={half}")  # one process, train.parallel=none
    assert result["start"] == 3
    single, _ = _train(*BASE, f"out={tmp_path}/single")
    _close(resumed, single)
    # the resumed single-process run writes the single-file layout from then on
    assert (half / "checkpoints" / "step-00000006" / "weights.safetensors").exists()


def test_sharded_checkpoint_serves_load_run(ranks, tmp_path):
    """A run still going (no export yet) is sampled from its latest sharded checkpoint."""
    import shutil

    from core import files
    from core.rundir import load_run

    _job(ranks, "_job_ddp")
    _, tmp = ranks
    running = tmp_path / "running"
    shutil.copytree(tmp / "ddp", running)
    (running / "student.safetensors").unlink()
    networks, spec, cfg = load_run(str(running))
    assert cfg.train.parallel == "ddp" and spec.sampler == "euler"
    _close(networks.student.state_dict(), files.load_tensors(str(tmp / "ddp" / "student.safetensors")), atol=0, rtol=0)


def test_fsdp2_on_gloo_equals_one_process(ranks, tmp_path):
    r0, r1 = _job(ranks, "_job_fsdp")
    single, _ = _train(*BASE, f"out={tmp_path}/single")
    _close(r0["weights"], single)  # rank 0 gathers the full weights for sampling and export
    # an FSDP run with EMA, sharded checkpoint at step 3, resumed in one process
    _, tmp = ranks
    resumed, result = _train(*BASE, "train.ema=0.9", f"out={tmp / 'fsdp-half'}")
    reference, _ = _train(*BASE, "train.ema=0.9", f"out={tmp_path}/ema")
    assert result["start"] == 3
    _close(resumed, reference)


def test_dmd2_ddp_equals_one_process(ranks, tmp_path):
    r0, _ = _job(ranks, "_job_dmd2")
    single, _ = _train(*DMD2, f"out={tmp_path}/single")
    _close(r0["weights"], single)


def test_ranks_disagreeing_on_config_fail_clearly(ranks):
    r0, r1 = _job(ranks, "_job_disagree")
    for res in (r0, r1):
        assert res["error"] is not None and "ranks disagree on the config" in res["error"]
        assert "train.lr" in res["error"] and "rank 1" in res["error"]


def test_ranks_with_train_parallel_none_fail_clearly(ranks):
    for res in _job(ranks, "_job_no_parallel"):
        assert res["error"] is not None and "train.parallel=ddp" in res["error"]


def test_torchrun_without_train_parallel_trains_with_ddp(ranks):
    auto0, auto1 = _job(ranks, "_job_auto")
    ddp0, _ = _job(ranks, "_job_ddp")
    _close(auto0["weights"], ddp0["weights"], atol=0, rtol=0)
    _close(auto0["weights"], auto1["weights"], atol=0, rtol=0)


def test_global_batch_must_split_evenly(tmp_path):
    from core.errors import UsageError
    from core.runner import Trainer

    with pytest.raises(UsageError, match="train.batch=64 .* does not split"):
        Trainer(run_config(*BASE, "train.grad_accum=3", f"out={tmp_path}/x"))


def test_slice_draws_match_the_global_draw():
    """Each micro-batch's rows of randn/rand/randint/randn_like/normal_ equal the global draw's rows."""
    from core.distributed import SliceDraws

    def draws(n):
        x = torch.empty(n, 3)
        return [torch.randn(n, 2), torch.rand((n,)), torch.randint(0, 9, (n, 2)), torch.randn_like(x),
                x.normal_().clone(), torch.randint(5, ()), torch.randn(4)]

    torch.manual_seed(7)
    whole = draws(6)
    after = torch.rand(1)
    for index in range(3):
        torch.manual_seed(7)
        with SliceDraws(2, 6, index):
            parts = draws(2)
        for w, p in zip(whole[:5], parts[:5]):
            torch.testing.assert_close(p, w[2 * index:2 * index + 2], atol=0, rtol=0)
        for w, p in zip(whole[5:], parts[5:]):  # non-batch draws are taken whole
            torch.testing.assert_close(p, w, atol=0, rtol=0)
        torch.testing.assert_close(torch.rand(1), after, atol=0, rtol=0)  # stream consumed identically
