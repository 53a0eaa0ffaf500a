"""One DMD2 training iteration on a full-size SDXL-architecture UNet at 1024 px (latents 128 x 128), bf16.

    .venv/bin/python -m pytest benchmarks/bench_sdxl_gpu.py --benchmark-only

The UNet is built from SDXL-base's published UNet config with random weights (no download); text
embeddings are random tensors of SDXL's shapes (77 x 2048 tokens, 1280 pooled), since the encoders are
not what DMD2 trains. The setting is DMD2's SDXL one (method note sec. 1, 8): a frozen bf16 teacher with
CFG 8, a LoRA generator (r=64, alpha=8), a full fine-tuned fake-score critic with the GAN head on its
mid block, batch 1, one generator step (K=1) and one critic update per iteration, bf16 autocast, gradient
checkpointing on the trainable UNets, fused AdamW. Reported in extra_info: latency (median), peak CUDA
memory, model FLOPs per iteration from ``torch.utils.flop_counter`` and MFU against the device's dense bf16
peak. Skipped without CUDA. Its FLOP count is of a whole step, so it includes checkpointing's recomputation;
benchmarks/gpu_check.py reports model FLOPs (MFU) and the baseline comparison.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

SDXL_UNET = {k: v for k, v in json.loads(Path(__file__).with_name("sdxl_unet.json").read_text()).items()
             if not k.startswith("_")}  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_TEXT = {"text": (77, 2048), "pooled": (1280,)}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}  # dense


class RandomBank:
    """Stands in for the prompt bank: fixed random embeddings of the given shapes (id -1: zeros, SDXL's null)."""

    def __init__(self, shapes: dict, device):
        g = torch.Generator(device="cpu").manual_seed(0)
        self.cond = {k: torch.randn(*s, generator=g).to(device) for k, s in shapes.items()}

    def lookup(self, cond, batch, device, dtype):
        null = cond is None
        return {k: (torch.zeros_like(v) if null else v).expand(batch, *v.shape).to(device, dtype)
                for k, v in self.cond.items()}


class BenchTeacher:
    """The Teacher protocol around a frozen DiffusersDenoiser (what DiffusersTeacher serves, minus the pipeline)."""

    def __init__(self, denoiser, guidance: float):
        self.denoiser, self.schedule, self.guidance = denoiser, denoiser.schedule, guidance
        self.data_shape = (denoiser.net.config.in_channels, denoiser.net.config.sample_size,
                           denoiser.net.config.sample_size)
        self.gan_feature_module, self.sigma_data = denoiser.gan_feature_module, 0.5

    @torch.no_grad()
    def denoise(self, x_t, t, cond=None, guidance=None):
        return self.denoiser.guided(x_t, t, cond, guidance)


def dmd2_setup(unet_config: dict, text_shapes: dict, device, batch: int = 1, lora_rank: int = 64,
               checkpointing: bool = True):
    """(step, nets): ``step()`` runs one DMD2 iteration (generator update, then critic update) as the runner does."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from core.protocols import Context
    from core.schedules import VPDiscreteSchedule
    from plugins.diffusers.networks import DiffusersDenoiser
    from plugins.diffusers.networks import NetConfig, add_lora
    from plugins.dmd2 import DMD2, DMD2Config

    device = torch.device(device)
    torch.manual_seed(0)
    master = UNet2DConditionModel(**unet_config)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    schedule, bank = VPDiscreteSchedule(sched.alphas_cumprod), RandomBank(text_shapes, device)
    res = unet_config["sample_size"] * 8

    def wrap(net):
        return DiffusersDenoiser(net, "sdxl", schedule, "eps", bank, res).to(device)

    half = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = BenchTeacher(wrap(copy.deepcopy(master).to(half).requires_grad_(False).eval()), guidance=8.0)
    student, critic = wrap(copy.deepcopy(master)), wrap(master)
    for net in (student, critic):
        net.train()
        if checkpointing:
            net.net.enable_gradient_checkpointing()
    if lora_rank:
        add_lora(student, NetConfig(lora_rank=lora_rank))
    objective = DMD2(DMD2Config(steps=1, gan="on"))
    nets = {"teacher": teacher, "student": student, "critic": critic}
    nets.update({k: m.to(device) for k, m in objective.build(nets).items()})
    phases = objective.phases()
    fused = {"fused": True} if device.type == "cuda" else {}
    params = {name: [p for p in nets[name].parameters() if p.requires_grad] for name in ("student", "critic", "gan_head")}
    opts = {ph.name: torch.optim.AdamW([p for n in ph.trains for p in params[n]], lr=1e-6, **fused) for ph in phases}
    x_real = torch.randn(batch, *teacher.data_shape, device=device)
    cond = torch.zeros(batch, dtype=torch.long, device=device)

    def step():
        ctx = Context(nets, {"x": x_real, "cond": cond}, 0, batch, device)
        for ph in phases:
            for name, ps in params.items():
                for p in ps:
                    p.requires_grad_(name in ph.trains)
            opts[ph.name].zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss, _ = objective.loss(ph.name, ctx)
            loss.backward()
            opts[ph.name].step()
        for ps in params.values():
            for p in ps:
                p.grad = None

    return step, nets


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


@pytest.mark.gpu
def test_dmd2_step_sdxl_1024(benchmark, machine):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: one DMD2 step on a full-size SDXL UNet at 1024 px does not fit a CPU run")
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from torch.utils.flop_counter import FlopCounterMode

    step, _ = dmd2_setup(SDXL_UNET, SDXL_TEXT, "cuda")
    step()  # warm-up: allocator, cuDNN autotuning, optimizer state
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()

    def timed():
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=5, warmup_rounds=1, iterations=1)
    median = benchmark.stats.stats.median
    name = torch.cuda.get_device_name(0)
    peak = peak_tflops(name)
    achieved = flops / median / 1e12
    benchmark.extra_info.update(
        machine=machine, latency_s=round(median, 4), peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
        model_tflop_per_iter=round(flops / 1e12, 2), achieved_tflops=round(achieved, 1),
        mfu=round(achieved / peak, 3) if peak else None, setting="DMD2 SDXL: LoRA-64 student, full critic, GAN, "
                                                            "batch 1, 1024 px, bf16 autocast, grad checkpointing")
