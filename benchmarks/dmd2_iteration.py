"""One DMD2 iteration (a generator step, then a fake-score critic step) on an SDXL-architecture UNet, in the
memory modes that benchmarks/gpu_check.py times side by side.

The iteration is DMD2's (Yin et al. 2024; method note docs/methods): the student maps noise at t = 999 to
x; x is re-noised at a random t; the teacher's CFG x0 and the critic's x0 give the distribution-matching
gradient g = (x0_fake - x0_real) / mean|x - x0_real|, applied through 0.5 mse(x, sg(x - g)); then the
critic takes one denoising (eps) step on the detached x. No GAN head, one generator step per critic step,
batch B, CFG scale 8, bf16 autocast, AdamW.

Modes:
- ``baseline-full``: as the official DMD2 code runs it: three full UNets (teacher bf16 frozen, student and
  critic fp32 with AdamW), separate cond and uncond teacher passes, eager torch math, no compile;
- ``baseline-lora``: the official code's LoRA setting: the same, but the student trains a LoRA adapter
  (rank 64, alpha 8) on its fp32 UNet;
- ``shared``: one frozen bf16 UNet with two LoRA adapters (``plugins.diffusers.shared``, the run option
  ``student=shared-lora critic=shared-lora``), the teacher's cond and uncond passes batched into one call, and
  the fused ``core.ops``; option ``compile_mode``: the UNet under ``torch.compile`` (as ``train.compile=true``
  compiles it), or ``regional``: only the repeated transformer blocks (``compile_repeated_blocks``, minutes less
  compiling), the first iteration compiling.
UNets are built on the meta device from a config (no weights read) and materialised with random weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SDXL_CONFIG = Path(__file__).with_name("sdxl_unet.json")
TINY_CONFIG = dict(  # an SDXL-shaped UNet small enough for a CPU run (gpu_check.py --tiny)
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[16, 32],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2], attention_head_dim=[2, 4], cross_attention_dim=24,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + 32, norm_num_groups=8)
GUIDANCE = 8.0  # DMD2's SDXL CFG scale
LORA = dict(rank=64, alpha=8.0)  # DMD2's SDXL LoRA
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)]  # dense TFLOP/s


def sdxl_config() -> dict:
    return {k: v for k, v in json.loads(SDXL_CONFIG.read_text()).items() if not k.startswith("_")}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for key, v in PEAK_BF16 if key in name), None)


def build_unet(config: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Built on the meta device (no memory, no init), then materialised on ``device`` with default init."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config).to(dtype)  # cast while empty: no transient fp32 copy on the GPU
    unet.to_empty(device=device)
    with torch.no_grad():
        for module in unet.modules():
            if module._parameters and hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return unet


def add_student_lora(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """A trainable LoRA adapter on a frozen UNet (the baseline's LoRA student); returns its parameters."""
    import peft

    from plugins.diffusers.networks import TARGETS

    unet.requires_grad_(False)
    unet.add_adapter(peft.LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], init_lora_weights="gaussian",
                                     target_modules=TARGETS["unet"]))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


class Problem:
    """The iteration's fixed inputs: SDXL's schedule, random text conditioning of SDXL's shapes."""

    def __init__(self, config: dict, batch: int, device: torch.device):
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.alpha = alphas_cumprod.sqrt().float().to(device)
        self.sigma = (1 - alphas_cumprod).sqrt().float().to(device)
        self.batch, self.device = batch, device
        size = config["sample_size"]
        self.shape = (batch, config["in_channels"], size, size)
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        g = torch.Generator().manual_seed(0)
        self.cond = dict(encoder_hidden_states=torch.randn(batch, 77, config["cross_attention_dim"], generator=g),
                         added_cond_kwargs={"text_embeds": torch.randn(batch, pooled, generator=g),
                                            "time_ids": torch.tensor([size * 8.0, size * 8, 0, 0, size * 8, size * 8])
                                            .repeat(batch, 1)})
        self.cond = _to(self.cond, device)
        self.uncond = _to(dict(encoder_hidden_states=torch.zeros_like(self.cond["encoder_hidden_states"]),
                               added_cond_kwargs={"text_embeds": torch.zeros_like(self.cond["added_cond_kwargs"]
                                                                                  ["text_embeds"]),
                                                  "time_ids": self.cond["added_cond_kwargs"]["time_ids"]}), device)
        self.t_gen = torch.full((batch,), 999, device=device)

    def times(self):
        t = torch.randint(20, 980, (self.batch,), device=self.device)
        return t, self.alpha[t], self.sigma[t]

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


def _to(tree, device):
    if isinstance(tree, dict):
        return {k: _to(v, device) for k, v in tree.items()}
    return tree.to(device)


def _cat(a: dict, b: dict) -> dict:
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    return torch.cat([a, b])


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _adamw(params, device):
    return torch.optim.AdamW(params, lr=1e-6, fused=device.type == "cuda")


# --------------------------------------------------------------------------- the modes


def baseline_step(config: dict, pb: Problem, *, lora_student: bool, checkpointing: bool,
                  channels_last: bool = False):
    """The official DMD2 code's shape: three UNets, eager torch, separate CFG passes."""
    dev = pb.device
    teacher = build_unet(config, dev, torch.bfloat16).requires_grad_(False).eval()
    student, critic = build_unet(config, dev, torch.float32), build_unet(config, dev, torch.float32)
    student_params = add_student_lora(student) if lora_student else list(student.parameters())
    if channels_last:
        for net in (teacher, student, critic):
            net.to(memory_format=torch.channels_last)
    for net in (student, critic):
        net.train()
        if checkpointing:
            net.enable_gradient_checkpointing()
    opt_g, opt_c = _adamw(student_params, dev), _adamw(critic.parameters(), dev)
    a_T, s_T = _col(pb.alpha[pb.t_gen]), _col(pb.sigma[pb.t_gen])

    def step():
        z = torch.randn(pb.shape, device=dev)
        with pb.autocast():
            eps_s = student(z, pb.t_gen, **pb.cond).sample
        x = (z - s_T * eps_s.float()) / a_T
        t, a, s = pb.times()
        a, s = _col(a), _col(s)
        x_t = a * x.detach() + s * torch.randn_like(x)
        with torch.no_grad(), pb.autocast():
            e_c = teacher(x_t, t, **pb.cond).sample.float()
            e_u = teacher(x_t, t, **pb.uncond).sample.float()
            x0_real = (x_t - s * (e_u + GUIDANCE * (e_c - e_u))) / a
            x0_fake = (x_t - s * critic(x_t, t, **pb.cond).sample.float()) / a
        p_real, p_fake = x - x0_real, x - x0_fake
        grad = torch.nan_to_num((p_real - p_fake) / p_real.abs().mean(dim=[1, 2, 3], keepdim=True))
        loss_g = 0.5 * F.mse_loss(x.float(), (x - grad).detach().float())
        loss_g.backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)

        t2, a2, s2 = pb.times()
        noise = torch.randn_like(x)
        x_t2 = _col(a2) * x.detach() + _col(s2) * noise
        with pb.autocast():
            eps = critic(x_t2, t2, **pb.cond).sample
        F.mse_loss(eps.float(), noise).backward()
        opt_c.step()
        opt_c.zero_grad(set_to_none=True)

    def forward():
        with torch.no_grad(), pb.autocast():
            teacher(torch.randn(pb.shape, device=dev), pb.t_gen, **pb.cond)

    return step, forward


def shared_step(config: dict, pb: Problem, *, checkpointing: bool, channels_last: bool = False,
                lora_input_cast: bool = False, compile_mode: str | None = None):
    """One bf16 UNet, two LoRA adapters, batched CFG, fused ops.

    lora_input_cast=True keeps peft's cast of each adapted layer's input to the fp32 adapter dtype, which
    ``SharedBase`` skips under autocast (two launches per adapted layer, 788 in SDXL, that change nothing):
    the row that measures what skipping it saves. compile_mode: ``torch.compile`` the UNet in place, with
    checkpointing through ``SharedBase.checkpoint`` as the run option does."""
    from core import ops
    from plugins.diffusers.shared import SharedBase

    dev = pb.device
    shared = SharedBase(build_unet(config, dev, torch.bfloat16), rank=LORA["rank"], alpha=LORA["alpha"])
    shared.unet.train()
    if checkpointing:
        func = {"gradient_checkpointing_func": shared.checkpoint} if compile_mode else {}
        shared.unet.enable_gradient_checkpointing(**func)
    if channels_last:
        shared.unet.to(memory_format=torch.channels_last)
    if compile_mode:  # as train.compile=true with train.compile_mode does it
        from core.compiling import compile_module

        compile_module(shared.unet, compile_mode)
    if lora_input_cast:
        shared._cast_adapter_inputs = lambda enabled: None  # peft's cast stays on, as before SharedBase skipped it
    opt_g, opt_c = (_adamw(shared.adapter_parameters(r), dev) for r in ("student", "critic"))
    a_T, s_T = pb.alpha[pb.t_gen], pb.sigma[pb.t_gen]
    both = _cat(pb.cond, pb.uncond)

    def step():
        shared.use("student")
        z = torch.randn(pb.shape, device=dev)
        with pb.autocast():
            eps_s = shared("student", z, pb.t_gen, **pb.cond).sample
        x = ops.guided_x0(eps_s, None, z, a_T, s_T, 1.0, "eps")
        t, a, s = pb.times()
        x_t, _ = ops.add_fresh_noise(x.detach(), a, s)
        with torch.no_grad(), pb.autocast():
            e_c, e_u = shared("teacher", torch.cat([x_t, x_t]), torch.cat([t, t]), **both).sample.chunk(2)
            x0_real = ops.guided_x0(e_c, e_u, x_t, a, s, GUIDANCE, "eps")
            x0_fake = ops.guided_x0(shared("critic", x_t, t, **pb.cond).sample, None, x_t, a, s, 1.0, "eps")
        ops.dmd_loss(x, x0_real, x0_fake).backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)

        shared.use("critic")
        t2, a2, s2 = pb.times()
        x_t2, noise = ops.add_fresh_noise(x.detach(), a2, s2)
        with pb.autocast():
            eps = shared("critic", x_t2, t2, **pb.cond).sample
        ops.weighted_loss(eps, noise, None, "l2").backward()
        opt_c.step()
        opt_c.zero_grad(set_to_none=True)

    def forward():
        with torch.no_grad(), pb.autocast():
            shared("teacher", torch.randn(pb.shape, device=dev), pb.t_gen, **pb.cond)

    return step, forward


def model_flops(forward_flops: float, student_full: bool, critic_full: bool) -> dict:
    """The iteration's model FLOPs from one batch-B forward F, pass by pass; a backward through a trained
    network costs 2F (input and weight gradients), through a frozen base under LoRA F (input gradients).
    Recomputation by gradient checkpointing is not counted."""
    passes = {"student forward": 1, "teacher forward (cond + uncond)": 2, "critic forward (fake score)": 1,
              "student backward": 2 if student_full else 1, "critic forward (denoising loss)": 1,
              "critic backward": 2 if critic_full else 1}
    return {"passes_in_forwards": passes, "total": forward_flops * sum(passes.values())}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(name: str, config: dict, batch: int, device: torch.device, *, iterations: int = 3,
             checkpointing: bool = True, forward_flops: dict | None = None, cudnn_benchmark: bool = False,
             channels_last: bool = False, lora_input_cast: bool = False, compile_mode: str | None = None,
             profile: bool = False) -> dict:
    """Build, warm up, time ``iterations`` iterations; seconds (median), peak memory, model FLOPs, MFU.

    forward_flops caches the counted forward FLOPs per batch size across modes (same architecture).
    profile: one more iteration under torch.profiler, summarised by ``profile_summary``."""
    from torch.utils.flop_counter import FlopCounterMode

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    benchmark_before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        pb = Problem(config, batch, device)
        start = time.perf_counter()
        if name == "shared":
            step, forward = shared_step(config, pb, checkpointing=checkpointing, channels_last=channels_last,
                                        lora_input_cast=lora_input_cast, compile_mode=compile_mode)
        else:
            step, forward = baseline_step(config, pb, lora_student=name == "baseline-lora",
                                          checkpointing=checkpointing, channels_last=channels_last)
        _sync(device)
        build_s = time.perf_counter() - start
        cache = {} if forward_flops is None else forward_flops
        if batch not in cache:
            with FlopCounterMode(display=False) as counter:
                forward()
            cache[batch] = float(counter.get_total_flops())
        start = time.perf_counter()
        step()  # warm-up: allocator, kernels' compilation, optimizer state, cuDNN's search when benchmarking
        _sync(device)
        warmup_s = time.perf_counter() - start  # with compile_mode: torch.compile's compile time
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
        profiled = None
        if profile:
            try:
                profiled = profile_summary(step, device)
            except Exception as e:  # the timing above still counts
                profiled = {"error": f"{type(e).__name__}: {e}"[:300]}
    finally:
        torch.backends.cudnn.benchmark = benchmark_before
    seconds = sorted(times)[len(times) // 2]
    flops = model_flops(cache[batch], student_full=name == "baseline-full", critic_full=name != "shared")
    peak = peak_flops(device)
    result = dict(mode=name, batch=batch, checkpointing=checkpointing, status="ok", seconds_per_iteration=seconds,
                  options=dict(cudnn_benchmark=cudnn_benchmark, channels_last=channels_last,
                               lora_input_cast=lora_input_cast, compile_mode=compile_mode),
                  iteration_times=times, build_seconds=build_s, warmup_seconds=warmup_s,
                  peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                  forward_tflop=cache[batch] / 1e12, model_tflop_per_iteration=flops["total"] / 1e12,
                  passes_in_forwards=flops["passes_in_forwards"],
                  achieved_tflops=flops["total"] / seconds / 1e12,
                  mfu=flops["total"] / seconds / peak if peak else None)
    if profiled:
        result["profile"] = profiled
    return result


def compile_comparison(config: dict, device: torch.device, time_left, save, *, need: float, iterations: int,
                       unet: str) -> dict:
    """The shared mode at batch 1 with checkpointing, eager then under ``torch.compile`` (mode default, as
    ``train.compile=true``), side by side: seconds per iteration, the compiled / eager ratio, and the compile
    time (the compiled row's warm-up iteration). Compile time is not bounded by ``time_left``, so the eager row
    goes to ``save`` before the compiled one starts; a row starts only with ``need`` seconds left."""
    import gc
    import traceback

    rows, flops = [], {}
    for options in ({}, {"compile_mode": "regional"}, {"compile_mode": "default"}):
        entry = dict(mode="shared", batch=1, checkpointing=True, options=options)
        if time_left() < need:
            rows.append({**entry, "status": "skipped: time budget"})
            continue
        try:
            rows.append(run_mode("shared", config, 1, device, iterations=iterations, checkpointing=True,
                                 forward_flops=flops, **options))
        except Exception as e:
            rows.append({**entry, "status": "error", "error": f"{type(e).__name__}: {e}"[:500],
                         "traceback": traceback.format_exc()[-1500:]})
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save({"status": "running", "unet": unet, "modes": rows})
    ok = {r["options"].get("compile_mode") or "eager": r["seconds_per_iteration"] for r in rows if r["status"] == "ok"}
    ratios = {mode: ok["eager"] / seconds for mode, seconds in ok.items() if mode != "eager" and "eager" in ok}
    return {"status": "ok", "unet": unet, "modes": rows, "speedup_compiled_over_eager": ratios}


def profile_summary(step, device: torch.device) -> dict:
    """One iteration under torch.profiler: wall time, summed self CPU and self GPU time, the number of aten
    calls, and key_averages tables (top 20 by GPU time, top 10 by CPU time). GPU time far below the wall
    time with CPU time near it means the iteration waits on the host launching kernels, not on the GPU."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    wall = time.perf_counter() - start
    averages = prof.key_averages()

    def total(attr):
        return sum(getattr(e, attr, 0) or 0 for e in averages) / 1e6

    def table(sort_by, rows):
        for key in (sort_by, sort_by.replace("device", "cuda")):
            try:
                return averages.table(sort_by=key, row_limit=rows, max_name_column_width=55)
            except (AttributeError, KeyError, ValueError):
                continue
        return "unavailable"

    gpu_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    return dict(wall_seconds=wall, self_cpu_seconds=total("self_cpu_time_total"),
                self_gpu_seconds=(total("self_device_time_total") or total("self_cuda_time_total")) if cuda else None,
                aten_calls=sum(e.count for e in averages if e.key.startswith("aten::")),
                top_gpu=table(gpu_key, 20), top_cpu=table("self_cpu_time_total", 10))
