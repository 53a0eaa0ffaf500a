"""The memory planner (core.plan): byte counts against materialised networks, activations against the
saved tensors of a real forward, the SDXL reference architecture against its published parameter counts,
and the ``plan`` command line."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.plan_model import Setting, make_plan, optimizer_bytes, setting_of
from tests.conftest import run_config


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def adamw_state_bytes(params) -> int:
    """Bytes of torch AdamW's state after one real step (the reference for the planner's formula)."""
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=1e-3)
    opt.step()
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def roles_of(plan) -> dict:
    return {r.name: r for r in plan.roles}


def check_role(r, modules):
    params = [p for m in modules for p in m.parameters()]
    trainable = [p for p in params if p.requires_grad]
    assert sum(r.params.values()) == nbytes(params)
    assert r.numel == sum(p.numel() for p in params)
    assert r.trainable == sum(p.numel() for p in trainable)
    assert r.grad == nbytes(trainable)
    if trainable:
        assert r.optim == adamw_state_bytes(trainable)


def test_gmm_default_counts_equal_the_materialised_networks():
    from core.roles import Networks

    cfg = run_config("train.batch=64", "train.ema=0.99")
    plan = make_plan(cfg, simulate=False)
    nets = Networks(cfg, device="cpu").nets
    roles = roles_of(plan)
    assert set(roles) == {"teacher", "student", "critic", "gan_head", "ema"}
    for name in ("student", "critic", "gan_head"):
        check_role(roles[name], [nets[name]])
    ema = roles["ema"]
    assert sum(ema.params.values()) == nbytes(copy.deepcopy(nets["student"]).parameters())
    assert ema.grad == ema.optim == 0
    assert plan.resident == sum(r.resident for r in plan.roles)


def test_optimizer_bytes_formula():
    p_big, p_small = torch.nn.Parameter(torch.zeros(5000)), torch.nn.Parameter(torch.zeros(10))
    assert optimizer_bytes([p_big, p_small], "adamw") == adamw_state_bytes([p_big, p_small])
    # 8-bit: 2 x 1 byte + 2 float32 absmax per 256 values (+ step) for >= 4096 values; small tensors stay 32-bit
    assert optimizer_bytes([p_big], "adamw8bit") == 2 * 5000 + 2 * 4 * 20 + 4
    assert optimizer_bytes([p_small], "adamw8bit") == 2 * 4 * 10 + 4


# -- diffusers pipelines ---------------------------------------------------------------------------------

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from tests.tiny_pipelines import sd3_dir, sd15_dir, sdxl_dir  # noqa: E402,F401


@pytest.mark.parametrize("family", ["sdxl", "sd15", "sd3"])
@pytest.mark.parametrize("lora", [0, 4])
def test_diffusers_counts_equal_the_loaded_pipeline(family, lora, request):
    """Built from config.json on fake tensors vs the pipeline loaded (weights read) on CPU."""
    from core.roles import Networks

    folder = request.getfixturevalue(f"{family}_dir")
    cfg = run_config("objective=dmd2", f"teacher={family}", f"teacher.path={folder}", "teacher.dtype=fp32", "data=none",
                     f"student.lora_rank={lora}", "train.batch=2")
    plan = make_plan(cfg, simulate=False)
    nets = Networks(cfg, device="cpu").nets
    roles = roles_of(plan)
    pipe = nets["teacher"].pipe
    check_role(roles["teacher"], [pipe.transformer if family == "sd3" else pipe.unet])
    check_role(roles["student"], [nets["student"]])
    check_role(roles["critic"], [nets["critic"]])
    if "gan_head" in nets:
        check_role(roles["gan_head"], [nets["gan_head"]])
    encoders = [getattr(pipe, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
                if getattr(pipe, n, None) is not None]
    check_role(roles["text_encoders"], encoders)
    check_role(roles["vae"], [pipe.vae])


def test_shared_base_counts_equal_a_materialised_shared_base(sdxl_dir):
    from diffusers import UNet2DConditionModel

    from plugins.diffusers.shared import SharedBase

    cfg = run_config("objective=dmd2", "teacher=sdxl", f"teacher.path={sdxl_dir}", "data=none", "objective.gan=off")
    plan = make_plan(cfg, Setting(batch=2, shared_base=True, student_lora=4), simulate=False)
    shared = SharedBase(UNet2DConditionModel.from_pretrained(sdxl_dir, subfolder="unet"), rank=4)
    roles = roles_of(plan)
    base = [p for n, p in shared.unet.named_parameters() if "lora_" not in n]
    assert roles["teacher"].params == {"bfloat16": nbytes(base)} and roles["teacher"].optim == 0
    for name in ("student", "critic"):
        params = shared.adapter_parameters(name)
        assert sum(roles[name].params.values()) == nbytes(params) == roles[name].grad
        assert roles[name].optim == adamw_state_bytes([p.requires_grad_(True) for p in params])


def saved_tensor_bytes(fn, existing) -> int:
    """Bytes of the distinct storages autograd saves during ``fn()`` (a real CPU forward), those of the
    ``existing`` tensors (weights, inputs) excluded, plus the output's: what a forward leaves for its backward."""
    skip = {t.untyped_storage().data_ptr() for t in existing}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    s = out.untyped_storage()
    storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("autocast", [False, True])
def test_activations_match_the_saved_tensors_of_a_real_forward(sdxl_dir, autocast):
    """The counted bytes alive after a forward on fake tensors vs a real CPU forward's saved tensors (within 5%)."""
    from diffusers import UNet2DConditionModel

    from core import memsim, plan_nets

    unet_real = UNet2DConditionModel.from_pretrained(sdxl_dir, subfolder="unet").train()
    fake = memsim.fake_mode()
    unet_fake = plan_nets.to_fake(plan_nets.on_meta(lambda: UNet2DConditionModel.from_config(unet_real.config)),
                                  fake).train()
    torch.manual_seed(0)
    args, kwargs = plan_nets.denoiser_inputs(unet_real, 4, (16, 16), 16)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with bf16:
        inputs = [*args, kwargs["encoder_hidden_states"], *kwargs["added_cond_kwargs"].values()]
        measured = saved_tensor_bytes(lambda: unet_real(*args, **kwargs).sample,
                                      [*unet_real.parameters(), *unet_real.buffers(), *inputs])
    with fake:
        args, kwargs = plan_nets.denoiser_inputs(unet_fake, 4, (16, 16), 16)
        with memsim.counting() as live, bf16:
            out = unet_fake(*args, **kwargs).sample
        counted = live.now
        del out
    assert measured > 0
    assert abs(counted - measured) / measured < 0.05, (counted, measured)


def test_sdxl_reference_architecture_has_the_published_parameter_counts():
    """UNet 2.567 B, CLIP-L text 123.06 M, OpenCLIP-bigG text + projection 694.66 M, VAE 83.65 M
    (stabilityai/stable-diffusion-xl-base-1.0); and issue 15's count of the default DMD2 run before
    activations (fp32 student and critic with AdamW, bf16 teacher/encoders/VAE): ~80 GB, ~91 GB with EMA."""
    before = {}
    for ema in ("0", "0.99"):
        plan = make_plan(run_config("objective=dmd2", "teacher=sdxl", f"train.ema={ema}"), simulate=False)
        before[ema] = (plan.resident + max(plan.phase_grads.values())) / 1e9
    roles = roles_of(plan)
    assert roles["teacher"].numel == roles["student"].numel == roles["ema"].numel == 2_567_463_684
    assert roles["text_encoders"].numel == 123_060_480 + 694_659_840
    assert roles["vae"].numel == 83_653_863
    assert 80 <= before["0"] < 81 and 90.5 <= before["0.99"] < 91.5


def test_setting_reads_the_run_config(sdxl_dir):
    cfg = run_config("objective=dmd2", "teacher=sdxl", f"teacher.path={sdxl_dir}", "student.lora_rank=8",
                     "teacher.gradient_checkpointing=true", "train.batch=8", "train.grad_accum=2", "train.ema=0.9",
                     "teacher.resolution=[32,48]")
    s = setting_of(cfg)
    assert (s.batch, s.student_lora, s.critic_lora, s.checkpointing, s.ema, s.latent) == (4, 8, 0, True, True, (4, 6))
    assert s == Setting(batch=4, latent=(4, 6), student_lora=8, checkpointing=True, ema=True, gan=True)


# -- command line ----------------------------------------------------------------------------------------

def test_plan_command_json(sdxl_dir, capsys):
    from core.run import main

    assert main(["plan", "objective=dmd2", "teacher=sdxl", f"teacher.path={sdxl_dir}", "train.batch=2",
                 "plan.gpu_memory=0.001", "plan.levers=false", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["gpu_memory_gib"] == 0.001
    assert out["peak_bytes"] == out["resident_bytes"] + max(out["phase_peak_bytes"].values())
    assert {r["name"] for r in out["roles"]} >= {"teacher", "student", "critic", "text_encoders", "vae"}


def test_plan_table_and_levers(capsys):
    from core.run import main

    assert main(["plan", "train.batch=64", "train.ema=0.9", "plan.gpu_memory=0.0001"]) == 0
    text = capsys.readouterr().out
    assert "does not fit" in text and "train.optimizer=adamw8bit" in text and "train.ema=0" in text


def test_train_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    from core.run import main

    assert main(["plan", "train.batch=64", "train.ema=0.9"]) == 0
    planned = capsys.readouterr().out
    assert main(["train.batch=64", "train.dry_run=true", "train.ema=0.9", f"out={tmp_path / 'run'}"]) == 0
    assert capsys.readouterr().out == planned and "peak:" in planned
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["teacher.bogus=1"], "unknown key 'teacher.bogus'"),
    (["plan.gpu_memory=lots"], "plan.gpu_memory"),
    (["plan.colour=red"], "unknown plan option"),
    (["teacher=sd15"], "needs teacher.path"),
])
def test_plan_bad_input_is_one_line(args, message, capsys):
    from core.run import main

    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fewstep: error:") and message in err and "\n" not in err


def cuda_peak_gib(mode: str) -> float:
    """The benchmark's peak at 512², measured in a child process with compiled kernels (this process has
    TRITON_INTERPRET=1 from conftest, and the interpreter cannot run kernels on CUDA tensors)."""
    root = Path(__file__).resolve().parent.parent
    code = ("import json, torch; from benchmarks.dmd2_iteration import run_mode, sdxl_config; "
            f"r = run_mode({mode!r}, {{**sdxl_config(), 'sample_size': 64}}, 1, torch.device('cuda'), "
            "iterations=1, checkpointing=True); print(json.dumps(r['peak_memory_gib']))")
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join(
        [str(root), str(root / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["shared", "baseline-lora", "baseline-full"])
def test_plan_within_10_percent_of_the_cuda_peak(mode):
    """The GPU suite's DMD2 iteration on an SDXL UNet at 512² (benchmarks/dmd2_iteration.py) vs its plan."""
    from benchmarks.dmd2_iteration import sdxl_config
    from benchmarks.plan_sdxl import BENCHMARK
    from diffusers import UNet2DConditionModel

    config = {**sdxl_config(), "sample_size": 64}
    measured = cuda_peak_gib(mode)
    cfg = run_config("objective=dmd2", "teacher=sdxl", "train.batch=1")
    components = {"reference": "SDXL UNet at 512", "unet": lambda: UNet2DConditionModel(**config)}
    planned = make_plan(cfg, Setting(batch=1, checkpointing=True, gan=False, **BENCHMARK[mode]), components).peak
    assert abs(planned / 2**30 - measured) / measured < 0.10, (planned / 2**30, measured)
