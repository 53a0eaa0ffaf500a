"""The host (CPU) cost of one DMD2 iteration, measured without a GPU: SDXL's UNet structure (every block,
layer and adapter of ``sdxl_unet.json``) with narrow channels and 8x8 latents, so the arithmetic is tiny and
what remains is Python, dispatch and autograd bookkeeping -- what made the H100 iteration host-bound
(docs/benchmarks.md). Prints CPU seconds per iteration (median of 5, one thread) and the aten call count:

    .venv/bin/python benchmarks/host_overhead.py [shared baseline-lora baseline-full] [--no-checkpointing]
"""

import sys
import time
from pathlib import Path

import torch
from torch.profiler import profile

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]
import dmd2_iteration as it  # noqa: E402

NARROW = dict(sample_size=8, block_out_channels=[32, 64, 128], attention_head_dim=[1, 2, 4], cross_attention_dim=32,
              addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32, norm_num_groups=8)


def measure(mode: str, checkpointing: bool) -> tuple[float, int]:
    config = {**it.sdxl_config(), **NARROW}
    pb = it.Problem(config, 1, torch.device("cpu"))
    if mode == "shared":
        step, _ = it.shared_step(config, pb, checkpointing=checkpointing)
    else:
        step, _ = it.baseline_step(config, pb, lora_student=mode == "baseline-lora", checkpointing=checkpointing)
    step()  # warm-up
    times = []
    for _ in range(5):
        start = time.process_time()
        step()
        times.append(time.process_time() - start)
    with profile() as prof:
        step()
    calls = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    return sorted(times)[2], calls


if __name__ == "__main__":
    torch.set_num_threads(1)
    modes = [a for a in sys.argv[1:] if not a.startswith("--")] or ["shared", "baseline-lora", "baseline-full"]
    ckpt = "--no-checkpointing" not in sys.argv
    for mode in modes:
        seconds, calls = measure(mode, ckpt)
        print(f"{mode:14s} checkpointing={ckpt}: {seconds:.3f} CPU s / iteration, {calls} aten calls", flush=True)
