"""The memory planner (core.plan) on full-size SDXL, on CPU: the table of docs/memory.md, and its predictions
for the exact configurations of the GPU benchmark (benchmarks/dmd2_iteration.py) next to the peaks measured
there (benchmarks/results/gpu-*.json).

    python benchmarks/plan_sdxl.py [--batch 1] [--compare benchmarks/results/gpu-nvidia-h100-80gb-hbm3.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.config import parse_overrides  # noqa: E402
from core.plan import replan  # noqa: E402
from core.plan_model import GiB, Setting, make_plan  # noqa: E402
from core.plan_nets import diffusers_components  # noqa: E402
from core.runconfig import resolve  # noqa: E402

MODES = {  # the memory modes of docs/memory.md, as the planner's settings
    "full fp32 student + critic": dict(),
    "LoRA student (r 64), full critic": dict(student_lora=64),
    "shared base (bf16 UNet + 2 adapters)": dict(shared_base=True, student_lora=64, critic_lora=64),
}
BENCHMARK = {  # benchmarks/dmd2_iteration.py's modes: no text encoders/VAE, no GAN head
    "baseline-full": dict(cfg_passes=2),
    "baseline-lora": dict(cfg_passes=2, student_lora=64),
    "shared": dict(shared_base=True, student_lora=64, critic_lora=64),
}


def sdxl_run():
    return resolve(parse_overrides(["objective=dmd2", "teacher=sdxl", "train.batch=1"]))


def table(batch: int) -> list[str]:
    cfg, comps = sdxl_run(), diffusers_components("sdxl", "")
    rows = ["| mode | checkpointing | peak GiB | + EMA | 8-bit AdamW | 8-bit AdamW + EMA | activations GiB |",
            "|---|---|---|---|---|---|---|"]
    for label, extra in MODES.items():
        for ckpt in (False, True):
            t0 = time.perf_counter()
            s = Setting(batch=batch, checkpointing=ckpt, **extra)
            p = make_plan(cfg, s, comps)
            alt = {k: replan(cfg, p, Setting(batch=batch, checkpointing=ckpt, **extra, **kw), comps).peak / GiB
                   for k, kw in (("ema", dict(ema=True)), ("8bit", dict(optimizer="adamw8bit")),
                                 ("both", dict(ema=True, optimizer="adamw8bit")))}
            act = max(v - p.phase_grads[k] for k, v in p.phases.items())
            rows.append(f"| {label} | {'on' if ckpt else 'off'} | {p.peak / GiB:.1f} | {alt['ema']:.1f} | "
                        f"{alt['8bit']:.1f} | {alt['both']:.1f} | {act / GiB:.1f} |")
            print(rows[-1], f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return rows


def compare(results: Path, batch: int | None) -> list[str]:
    """Planned vs measured peaks of the plain DMD2 rows of a gpu-check JSON or a dmd2_rows.py one (``calls``)
    at ``batch`` (None: every batch)."""
    data = json.loads(results.read_text())
    measured = ([m for call in data["calls"] for m in call] if "calls" in data
                else data["sections"]["dmd2"]["modes"])
    cfg = sdxl_run()
    comps = {k: v for k, v in diffusers_components("sdxl", "").items() if k in ("reference", "unet")}
    rows = ["| mode | batch | checkpointing | measured peak GiB | planned peak GiB | error |",
            "|---|---|---|---|---|---|"]
    for m in measured:
        if m.get("status") != "ok" or batch not in (None, m["batch"]) or any((m.get("options") or {}).values()):
            continue  # only the plain modes (the options are speed experiments)
        s = Setting(batch=m["batch"], checkpointing=m["checkpointing"], gan=False, **BENCHMARK[m["mode"]])
        planned = make_plan(cfg, s, comps).peak / GiB
        got = m["peak_memory_gib"]
        rows.append(f"| {m['mode']} | {m['batch']} | {m['checkpointing']} | {got:.1f} | {planned:.1f} | "
                    f"{(planned - got) / got:+.1%} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=None, help="default: 1, or every batch with --compare")
    ap.add_argument("--compare", type=Path, help="a gpu-check JSON (or dmd2_rows.py's): planned vs measured peaks "
                                                 "of its DMD2 rows")
    args = ap.parse_args()
    rows = compare(args.compare, args.batch) if args.compare else table(args.batch or 1)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
