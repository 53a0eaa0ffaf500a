"""Multi-rank checkpoint state, in one process: the torch.distributed.checkpoint (DCP) files and each rank's RNG
stream written and restored exactly, and a single-process checkpoint resumed on several ranks.

tests/test_distributed.py runs these paths in spawned ranks; here a rank is played by setting the run's
``parallel.world``/``rank`` (DCP saves and loads without a process group in one process), so that mutation runs,
which cannot see subprocesses, check them too."""

from __future__ import annotations

import re
import warnings

import attrs

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_config, train
from core import checkpoint as ckpt
from core import distributed, files, rundir
from core.errors import UsageError
from core.roles import set_seed
from core.runner import Trainer

# one process plays every rank: DCP's single-process notice and its overwrite of the shared dcp/ directory
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled", "ignore:Detected an existing checkpoint")

FAST = ["objective=denoise", "train.batch=16", "train.eval_every=0", "train.preview_every=0", "student.hidden=16",
        "student.depth=1", "student.emb_dim=8", "train.ema=0.5", "train.log_every=1"]


def _trainer(out, *overrides, rank=0, world=2, mode="ddp"):
    """A built run whose RunState acts as ``rank`` of ``world`` (no process group, no DDP wrapping)."""
    trainer = Trainer(run_config(*FAST, f"out={out}", *overrides))
    trainer.build()
    p = trainer.state.parallel
    p.world, p.rank, p.main, p.mode = world, rank, rank == 0, mode
    trainer.state.log = trainer.log = _Log()
    return trainer


class _Log(list):
    def __call__(self, msg):
        self.append(msg)


def _weights(trainer) -> dict:
    return {f"{prefix}.{k}": v.clone() for prefix, m in trainer.state.modules.items()
            for k, v in m.state_dict().items()}


def _moments(trainer) -> dict:
    return {f"{name}.{i}.{k}": v.clone() for name, opt in trainer.state.optimizers.items()
            for i, s in opt.state_dict()["state"].items() for k, v in s.items() if torch.is_tensor(v)}


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _two_rank_save(tmp_path, *overrides, step=3):
    """Saves one run's state as rank 0 and as rank 1 of 2, each with its own RNG stream; returns the run dir,
    the step directory, the saved weights and optimizer moments, each rank's RNG state and the sampling spec."""
    out = tmp_path / "run"
    trainer = _trainer(out, *overrides, "train.steps=6")
    rundir.write_run_files(trainer.cfg, trainer.spec)  # what a run writes before its first step
    torch.manual_seed(5)
    for opt in trainer.state.optimizers.values():  # moments that differ from a fresh optimizer's
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.randn_like(p)
        opt.step()
    rngs = {}
    for rank in (0, 1):
        p = trainer.state.parallel
        p.rank, p.main = rank, rank == 0
        torch.manual_seed(100 + rank)
        rngs[rank] = torch.get_rng_state()
        d = trainer.state.save(step, trainer.spec)
    return out, d, _weights(trainer), _moments(trainer), rngs, trainer.spec


def test_a_sharded_save_writes_dcp_each_ranks_rng_and_then_latest(tmp_path):
    out, d, _, _, rngs, spec = _two_rank_save(tmp_path)
    root = out / "checkpoints"
    assert d == files.join(str(root), "step-00000003")
    assert sorted(p.name for p in (root / "step-00000003").iterdir()) == ["dcp", "rng-00000.safetensors",
                                                                          "rng-00001.safetensors", "state.json"]
    for rank in (0, 1):
        assert torch.equal(load_file(root / "step-00000003" / f"rng-{rank:05d}.safetensors")["rng.cpu"], rngs[rank])
    state = files.read_json(root / "step-00000003" / "state.json")
    assert state == {"step": 3, "spec": attrs.asdict(spec), "world_size": 2,
                     "rng": "shared", "format": "dcp"}
    assert files.read_json(root / "latest.json") == {"step": 3, "dir": "step-00000003", "format": "dcp"}
    assert ckpt.CheckpointStore(str(out)).latest()["format"] == "dcp"


@pytest.mark.parametrize("rank", [0, 1])
def test_a_sharded_checkpoint_restores_weights_moments_and_the_ranks_own_stream(tmp_path, rank):
    out, _, weights, moments, rngs, _ = _two_rank_save(tmp_path)
    resumed = _trainer(out, "train.steps=6", rank=rank)
    with torch.no_grad():
        for m in resumed.state.modules.values():
            for p in m.parameters():
                p.fill_(7.0)
    torch.manual_seed(999)
    assert resumed.state.restore() == 3
    _equal(_weights(resumed), weights)
    _equal(_moments(resumed), moments)
    assert torch.equal(torch.get_rng_state(), rngs[rank])
    assert resumed.log == []
    for opt in resumed.state.optimizers.values():  # the schedules continue at iteration 3
        assert opt.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["initial_lr"])
        assert resumed.state.schedules[next(iter(resumed.state.schedules))].last_epoch == 3


def test_a_rank_the_checkpoint_lacks_takes_rank_0s_shared_stream(tmp_path):
    out, _, weights, _, rngs, _ = _two_rank_save(tmp_path)
    resumed = _trainer(out, "train.steps=6", rank=2, world=3)
    assert resumed.state.restore() == 3
    _equal(_weights(resumed), weights)
    assert torch.equal(torch.get_rng_state(), rngs[0])
    assert resumed.log == []


def test_per_rank_streams_seed_a_new_stream_for_a_rank_the_checkpoint_lacks(tmp_path):
    out, *_, rngs, _ = _two_rank_save(tmp_path, "train.rng=per-rank")
    resumed = _trainer(out, "train.rng=per-rank", "train.steps=6", rank=2, world=3)
    assert resumed.state.restore() == 3
    restored = torch.get_rng_state()
    set_seed(distributed.rank_seed(resumed.cfg.seed + 3, 2))
    assert torch.equal(restored, torch.get_rng_state())
    assert not torch.equal(restored, rngs[0])
    assert resumed.log == ["fewstep: rank 2 had no saved RNG stream; seeded a new one"]
    own = _trainer(out, "train.rng=per-rank", "train.steps=6", rank=1)
    assert own.state.restore() == 3 and torch.equal(torch.get_rng_state(), rngs[1]) and own.log == []
    (out / "checkpoints" / "step-00000003" / "rng-00001.safetensors").unlink()  # rank 1's stream lost
    lost = _trainer(out, "train.rng=per-rank", "train.steps=6", rank=1)
    assert lost.state.restore() == 3 and lost.log == ["fewstep: rank 1 had no saved RNG stream; seeded a new one"]


@pytest.mark.parametrize("rng", ["shared", "per-rank"])
def test_a_single_process_checkpoint_resumed_on_two_ranks(tmp_path, rng):
    """Rank 0 takes the saved stream; rank 1 takes it too on a shared stream, a fresh (seed, rank, step) one
    per rank."""
    out = tmp_path / "run"
    train(*FAST, f"out={out}", f"train.rng={rng}", "train.steps=2", "train.ckpt_every=2")
    saved = load_file(out / "checkpoints" / "step-00000002" / "state.safetensors")["rng.cpu"]
    weights = load_file(out / "checkpoints" / "step-00000002" / "weights.safetensors")
    for rank in (0, 1):
        resumed = _trainer(out, f"train.rng={rng}", "train.steps=4", "train.ckpt_every=2", rank=rank)
        torch.manual_seed(999)
        assert resumed.state.restore() == 2
        _equal(_weights(resumed), dict(weights))
        if rank == 1 and rng == "per-rank":
            set_seed(distributed.rank_seed(resumed.cfg.seed + 2, 1))
            expect = torch.get_rng_state()
            assert resumed.log == ["fewstep: rank 1 had no saved RNG stream; seeded a new one"]
        else:
            expect = saved
            assert resumed.log == []
        resumed.state.restore()
        assert torch.equal(torch.get_rng_state(), expect), (rank, rng)


def test_fsdp_refuses_a_single_process_checkpoint_with_the_fix(tmp_path):
    out = tmp_path / "run"
    train(*FAST, f"out={out}", "train.steps=2", "train.ckpt_every=2")
    resumed = _trainer(out, "train.steps=4", "train.ckpt_every=2", mode="fsdp")
    with pytest.raises(UsageError, match="^" + re.escape(f"out={out} holds a single-process checkpoint; resume it "
                                                         "once with train.parallel=ddp (or in one process), then "
                                                         "switch to fsdp") + "$"):
        resumed.state.restore()


def test_sharded_saves_keep_the_last_two(tmp_path):
    out = tmp_path / "run"
    trainer = _trainer(out, "train.steps=4")
    rundir.write_run_files(trainer.cfg, trainer.spec)
    for step in (1, 2, 3):
        trainer.state.save(step, trainer.spec)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.json", "step-00000002",
                                                                        "step-00000003"]
    assert files.read_json(out / "checkpoints" / "latest.json")["step"] == 3


def test_a_non_main_rank_writes_only_its_rng(tmp_path):
    out = tmp_path / "run"
    store = ckpt.CheckpointStore(str(out))
    (out / "checkpoints" / "step-00000005").mkdir(parents=True)  # rank 0 made it (before the barrier)
    module = torch.nn.Linear(2, 2)
    store.save_sharded(5, {"student": module}, {}, {"rng.cpu": torch.get_rng_state()}, {"step": 5}, rank=1,
                       main=False)
    names = sorted(p.name for p in (out / "checkpoints" / "step-00000005").iterdir())
    assert names == ["dcp", "rng-00001.safetensors"] and not (out / "checkpoints" / "latest.json").exists()


def test_load_sharded_module_reads_the_first_prefix_present(tmp_path):
    student, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    url = str(tmp_path / "dcp")
    ckpt.save_sharded(url, ckpt.sharded_state({"student": student, "ema": ema}, {}))
    plain = torch.nn.Linear(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one process reading DCP files is the intent here: no warning
        assert ckpt.load_sharded_module(url, plain, ["ema", "student"]) == "ema"
    _equal(plain.state_dict(), ema.state_dict())
    assert ckpt.load_sharded_module(url, plain, ["critic", "student"]) == "student"
    _equal(plain.state_dict(), student.state_dict())
    with pytest.raises(ValueError, match=re.escape(f"{url} holds none of ['critic', 'fake']")):
        ckpt.load_sharded_module(url, plain, ["critic", "fake"])


def test_sharded_state_round_trips_through_an_fsspec_url():
    """A non-file URL goes through DCP's fsspec writer and reader (memory:// here, s3:// or gs:// for users)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    url = "memory://fewstep-test/dcp"
    ckpt.save_sharded(url, ckpt.sharded_state({"student": model}, {"student": opt}))
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    ckpt.load_sharded(url, {"student": fresh}, {"student": fresh_opt})
    _equal(fresh.state_dict(), model.state_dict())
    for a, b in zip(opt.state_dict()["state"].values(), fresh_opt.state_dict()["state"].values()):
        _equal(a, b)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    writer, reader = ckpt._writer_reader(url)
    assert isinstance(writer, FsspecWriter) and isinstance(reader, FsspecReader)
    local = ckpt._writer_reader("file:///tmp/x/dcp")
    assert [str(w.path) for w in local] == ["/tmp/x/dcp", "/tmp/x/dcp"]


class _FakeCuda:
    """torch.cuda's RNG calls, recorded: a CPU machine checks which CUDA stream goes where."""

    def __init__(self, monkeypatch, devices=2, available=True):
        self.streams = [torch.full((4,), 10 + i, dtype=torch.uint8) for i in range(devices)]
        self.calls = []
        fakes = {"get_rng_state": lambda device: self.streams[device.index or 0],
                 "set_rng_state": lambda state, device: self.calls.append(("set", state, device))}
        if available:  # DCP asks too: the sharded test leaves it False
            fakes |= {"is_available": lambda: True, "device_count": lambda: devices,
                      "get_rng_state_all": lambda: list(self.streams),
                      "set_rng_state_all": lambda states: self.calls.append(("set_all", states))}
        for name, fn in fakes.items():
            monkeypatch.setattr(torch.cuda, name, fn)


def test_cuda_streams_of_a_one_process_run_are_saved_and_restored(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path / "run", "train.steps=4", world=1, mode="none")
    cuda = _FakeCuda(monkeypatch)  # after the build, which would otherwise pick a CUDA device
    rundir.write_run_files(trainer.cfg, trainer.spec)
    d = trainer.state.save(2, trainer.spec)
    saved = load_file(f"{d}/state.safetensors")
    assert torch.equal(saved["rng.cuda0"], cuda.streams[0]) and torch.equal(saved["rng.cuda1"], cuda.streams[1])
    assert trainer.state.restore() == 2
    ((what, states),) = cuda.calls
    assert what == "set_all" and [s.tolist() for s in states] == [s.tolist() for s in cuda.streams]


def test_each_ranks_cuda_stream_is_saved_and_restored_on_its_device(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path / "run", "train.steps=4")
    cuda = _FakeCuda(monkeypatch, available=False)
    rundir.write_run_files(trainer.cfg, trainer.spec)
    p = trainer.state.parallel
    for rank in (0, 1):  # where each rank's stream lives; the weights stay on the CPU
        p.rank, p.main, p.device = rank, rank == 0, torch.device("cuda", rank)
        d = trainer.state.save(2, trainer.spec)
        assert torch.equal(load_file(f"{d}/rng-{rank:05d}.safetensors")["rng.cuda"], cuda.streams[rank])
    assert trainer.state.restore() == 2  # as rank 1
    ((what, state, device),) = cuda.calls
    assert what == "set" and torch.equal(state, cuda.streams[1]) and device == torch.device("cuda", 1)
