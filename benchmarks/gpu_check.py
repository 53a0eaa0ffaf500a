"""The one-command GPU suite (issue 15): kernel tests, fused ops vs eager vs torch.compile, and the full-size
SDXL-architecture DMD2 iteration in each memory mode, with a baseline timed in the same run.

    run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=480)      # on the lent machine
    python3 benchmarks/gpu_check.py [--tiny] [--quick] [--sections a,b] [--out DIR] [--budget SCALE]

Writes ``benchmarks/results/gpu-<device>.json`` and ``.md`` (copied into ``$OUT`` when set) after every row and
section, so a run cut short keeps what it measured; each section has a time budget (under 8 minutes in all)
and a failing one records its error. ``--quick``: the short rerun (files ``*-rerun.*``). ``--tiny``: the same
script end to end on CPU at tiny sizes, kernels under TRITON_INTERPRET=1 (tests/test_gpu_check.py). The repo
need not be pip-installed. Sections, rows and budgets: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = "--tiny" in sys.argv
QUICK = "--quick" in sys.argv
if TINY:  # the interpreter must be chosen before anything imports triton
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["FEWSTEP_KERNELS"] = "triton"
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402

BUDGET = {"kernel_tests": 90, "dmd2": 185, "ops": 35, "dmd2_compile": 110}  # seconds per section, in run order
TOTAL = 420  # seconds for all four, under 8 minutes (the lent machine's start and the wheel install come on top)
DEFAULT_SECTIONS = "dmd2,ops,kernel_tests,dmd2_compile"  # --tiny leaves dmd2_compile out (minutes of CPU compile)
QUICK_BUDGET = {"kernel_tests": 65, "dmd2": 110}  # --quick: kernel tests first (their messages), then DMD2
QUICK_TOTAL = 175  # a row started in time may run ~20 s over; the wheel install and imports come on top
OP_SIZES = {"sdxl-b1": (1, 4, 128, 128), "sdxl-b4": (4, 4, 128, 128), "large": (32, 16, 256, 256)}
TINY_OP_SIZES = {"tiny-b4": (4, 4, 8, 8)}
TINY_OPS = ("guided_x0", "add_fresh_noise", "dmd_loss")  # forward, one that cannot compile dynamic, a loss
KERNEL_TEST_FILTER_TINY = "block1024 and (dmd_fp16 or factors_with_any_stride and strided)"


class Clock:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# --------------------------------------------------------------------------- a. kernel tests


def kernel_tests(clock: Clock) -> dict:
    """tests/test_kernels.py and _dispatch.py, compiled on the GPU (interpreted on CPU with --tiny), in a subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "FEWSTEP_KERNELS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    files = [str(ROOT / "tests" / f) for f in ("test_kernels.py", "test_kernels_dispatch.py")]
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-rfE",
           "--tb=short"]
    env["COLUMNS"] = "400"  # the summary line keeps each failure's message
    if TINY:
        env.update(TRITON_INTERPRET="1", FEWSTEP_TEST_DEVICE="cpu")
        cmd += ["-k", KERNEL_TEST_FILTER_TINY]
    else:  # tests/conftest.py sets TRITON_INTERPRET=1 unless it is set: "0" keeps the compiler
        env.update(TRITON_INTERPRET="0", FEWSTEP_TEST_DEVICE="cuda")
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=max(clock.left(), 5))
        out, status = proc.stdout + proc.stderr, ("ok" if proc.returncode == 0 else f"exit {proc.returncode}")
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        status = "timeout (counts are of the tests that finished)"
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", out)}
    if "passed" not in counts:  # no summary line (timeout): count the progress characters
        progress = "".join(line for line in out.splitlines() if re.fullmatch(r"[.FEsx]+( +\[ *\d+%\])?", line))
        counts = {"passed": progress.count("."), "failed": progress.count("F"), "errors": progress.count("E")}
    failures = [line[:400] for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))][:20]
    tracebacks = re.search(r"^=+ (?:FAILURES|ERRORS) =+$(.*?)^=+ short test summary", out, re.M | re.S)
    return {"status": status, "counts": counts, "failures": failures, "tail": out[-1500:],
            "tracebacks": tracebacks.group(1).strip()[:12000] if tracebacks else ""}


# --------------------------------------------------------------------------- b. fused ops


def _timer(device, warmup: int, reps: int):
    def time_it(fn) -> float:
        """Median seconds of one call, after warm-up (compilation, allocator)."""
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
            else:
                start = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - start)
        return sorted(samples)[len(samples) // 2]

    return time_it


def ops_bench(clock: Clock, device) -> dict:
    """Each case of benchmarks/bench_kernels.py: eager reference, torch.compile of it, core.ops (fused), and
    torch.compile around core.ops (the custom ops are opaque to Inductor: does compiling around them pay?)."""
    import bench_kernels

    bench_kernels.DEVICE = device.type
    backend = "aot_eager" if TINY else "inductor"  # Inductor's C++ build is minutes on a small CPU
    time_it = _timer(device, *((1, 1) if TINY else (3, 20)))
    rows, dynamic = [], {}

    def measure(case, shape, fn) -> float:
        torch.manual_seed(0)
        inputs = case.inputs(shape)
        leaf = inputs.get(case.backward) if case.backward else None

        def call():
            out = fn(**inputs)
            if leaf is not None:
                out.backward()
                leaf.grad = None

        return time_it(call)

    for size, shape in (TINY_OP_SIZES if TINY else OP_SIZES).items():
        for case in [c for c in bench_kernels.CASES if not TINY or c.name in TINY_OPS]:
            variants = {"eager": case.eager, "compiled": case.eager, "fused": case.fused, "fused+compiled": case.fused}
            row = {"op": case.name, "size": size, "shape": list(shape),
                   "mode": "forward+backward" if case.backward else "forward", "ms": {}, "gb_per_s": {}}
            for variant, fn in variants.items():
                if clock.left() < 2:
                    row["ms"][variant] = "skipped: time budget"
                    continue
                key = (case.name, variant)
                try:
                    if "compiled" in variant:
                        # dynamic shapes: one compile serves every size (compiles dominate this section)
                        if dynamic.get(key, True):
                            dynamic.setdefault(key, torch.compile(fn, backend=backend, dynamic=True))
                            try:
                                seconds = measure(case, shape, dynamic[key])
                            except Exception:  # e.g. randn of a symbolic shape: one static compile per size
                                dynamic[key] = False
                        if not dynamic[key]:
                            seconds = measure(case, shape, torch.compile(fn, backend=backend, dynamic=False))
                    else:
                        seconds = measure(case, shape, fn)
                    nbytes = case.tensors_moved * torch.Size(shape).numel() * 4
                    row["ms"][variant], row["gb_per_s"][variant] = seconds * 1e3, nbytes / seconds / 1e9
                except Exception as e:  # one failing variant does not stop the table
                    row["ms"][variant] = f"error: {type(e).__name__}: {str(e)[:200]}"
            eager, fused = row["ms"].get("eager"), row["ms"].get("fused")
            if all(isinstance(v, float) for v in (eager, fused)):
                row["fused_speedup_over_eager"] = eager / fused
                if isinstance(row["ms"].get("compiled"), float):
                    row["fused_speedup_over_compiled"] = row["ms"]["compiled"] / fused
            rows.append(row)
    return {"status": "ok", "dtype": "float32", "backend": backend, "rows": rows}


# --------------------------------------------------------------------------- c. DMD2 iteration


QUICK_PLAN = [  # (mode, batch, checkpointing, options): the profiled row first, the cuDNN search last
    ("shared", 1, False, {"profile": True}), ("baseline-full", 1, True, {}), ("shared", 1, True, {}),
    ("baseline-lora", 1, True, {}), ("shared", 1, False, {"lora_input_cast": True}),
    ("shared", 1, False, {"cudnn_benchmark": True, "channels_last": True})]


def dmd2_bench(clock: Clock, device, save=lambda partial: None) -> dict:
    """The plan's rows in order; ``save`` gets the section so far after each row (a cut-short run keeps them)."""
    import dmd2_iteration as it

    config = it.TINY_CONFIG if TINY else it.sdxl_config()
    # batch 1 side by side, then the batches that only the shared mode's memory allows (throughput per GPU)
    plan = [("shared", 1, True, {"profile": not TINY}), ("baseline-full", 1, True, {}),
            ("baseline-lora", 1, True, {}),
            ("shared", 4, True, {}), ("baseline-full", 2, True, {}), ("shared", 8, True, {}),
            ("shared", 4, False, {})]
    if QUICK:
        plan = QUICK_PLAN
    if TINY:
        plan = plan[:4] if not QUICK else [p for p in plan if p[0] == "shared"]
    need = 2 if TINY else 20 if QUICK else 30  # seconds a mode needs at least (build, warm-up, iterations)
    results, flops = [], {}
    section = {"status": "running", "resolution": config["sample_size"] * 8,
               "unet": "tiny" if TINY else "SDXL (random weights)", "modes": results}
    for name, batch, ckpt, options in plan:
        entry = dict(mode=name, batch=batch, checkpointing=ckpt, options=options)
        if clock.left() < need:
            results.append({**entry, "status": "skipped: time budget"})
            continue
        try:
            results.append(it.run_mode(name, config, batch, device, iterations=1 if TINY else 2 if QUICK else 3,
                                       checkpointing=ckpt, forward_flops=flops, **options))
        except torch.cuda.OutOfMemoryError as e:
            results.append({**entry, "status": "does not fit", "error": str(e).split("\n")[0][:300],
                            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30})
        except Exception as e:
            results.append({**entry, "status": "error", "error": f"{type(e).__name__}: {e}"[:500],
                            "traceback": traceback.format_exc()[-1500:]})
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save(section)
    timed = {(r["mode"], r["batch"], r["checkpointing"]): r["seconds_per_iteration"] for r in results
             if r["status"] == "ok" and not any(v for k, v in r.get("options", {}).items() if k != "profile")}
    speedups = {}
    for (mode, batch, ckpt), seconds in timed.items():
        shared = timed.get(("shared", batch, ckpt))
        if mode != "shared" and shared:
            speedups[f"{mode} / shared (batch {batch}, checkpointing {ckpt})"] = seconds / shared
    best = {}  # images per second at the best batch each mode fits and ran
    for (mode, batch, _), seconds in timed.items():
        best[mode] = max(best.get(mode, 0.0), batch / seconds)
    for mode, rate in best.items():
        if mode != "shared" and "shared" in best:
            speedups[f"throughput shared / {mode} (each at its best batch)"] = best["shared"] / rate
    return {"status": "ok", "resolution": config["sample_size"] * 8,
            "unet": "tiny" if TINY else "SDXL (random weights)",
            "guidance": it.GUIDANCE, "lora": it.LORA, "peak_bf16_flops": it.peak_flops(device), "modes": results,
            "speedup": speedups, "images_per_second_best": best}


def dmd2_compile_bench(clock: Clock, device, save=lambda partial: None) -> dict:
    """The shared mode eager vs torch.compile (``dmd2_iteration.compile_comparison``); last in the suite."""
    import dmd2_iteration as it

    return it.compile_comparison(it.TINY_CONFIG if TINY else it.sdxl_config(), device, clock.left, save,
                                 need=5 if TINY else 60, iterations=1 if TINY else 3,
                                 unet="tiny" if TINY else "SDXL (random weights)")


# --------------------------------------------------------------------------- report


def _fmt(v, digits=3):
    """A table cell: floats to 3 significant digits, text on one line without the table's separator."""
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return "" if v is None else " ".join(str(v).split()).replace("|", "/")[:160]


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device']}", "", f"torch {report['torch']}, triton {report['triton']}, "
             f"diffusers {report['diffusers']}, {report['started']}{' (--tiny, CPU)' if TINY else ''}", ""]
    kt = report["sections"].get("kernel_tests")
    if kt:
        lines += ["## Kernel tests (tests/test_kernels.py, test_kernels_dispatch.py)", "",
                  f"status: {kt.get('status')}, counts: {kt.get('counts', {})}",
                  *[f"- {f}" for f in kt.get("failures", [])], ""]
    ob = report["sections"].get("ops")
    if ob and ob.get("rows"):
        lines += ["## Fused ops (fp32; ms and achieved GB/s of compulsory traffic)", "",
                  "| op | mode | size | eager | compiled | fused | fused+compiled | fused vs eager "
                  "| fused vs compiled |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in ob["rows"]:
            ms, rate = r["ms"], r["gb_per_s"]
            cells = [f"{_fmt(ms[v])} ms ({_fmt(rate[v])} GB/s)" if isinstance(ms.get(v), float) else _fmt(ms.get(v))
                     for v in ("eager", "compiled", "fused", "fused+compiled")]
            ratios = [f"{_fmt(r.get(k))}x" for k in ("fused_speedup_over_eager", "fused_speedup_over_compiled")]
            lines.append(f"| {r['op']} | {r['mode']} | {r['size']} | " + " | ".join(cells + ratios) + " |")
        lines.append("")
    dm = report["sections"].get("dmd2")
    if dm and dm.get("modes"):
        lines += [f"## DMD2 iteration, {dm['unet']} UNet at {dm['resolution']} px (generator + critic step)", "",
                  "| mode | batch | checkpointing | options | status | s / iteration | images / s | peak GiB "
                  "| model TFLOP / it | TFLOP/s | MFU |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in dm["modes"]:
            options = ", ".join(k for k, v in r.get("options", {}).items() if v) or "-"
            lines.append(f"| {r['mode']} | {r['batch']} | {r['checkpointing']} | {options} | {r['status']} | "
                         f"{_fmt(r.get('seconds_per_iteration'))} | "
                         f"{_fmt(r['batch'] / r['seconds_per_iteration'] if r.get('seconds_per_iteration') else None)}"
                         f" | {_fmt(r.get('peak_memory_gib'))} | "
                         f"{_fmt(r.get('model_tflop_per_iteration'))} | {_fmt(r.get('achieved_tflops'))} | "
                         f"{_fmt(r.get('mfu'))} |")
        lines += ["", *[f"- speed-up {k}: {v:.2f}x" for k, v in dm.get("speedup", {}).items()],
                  *[f"- {r['mode']} (batch {r['batch']}): {_fmt(r['error'])}" for r in dm["modes"] if "error" in r], ""]
        for r in dm["modes"]:
            if "profile" in r and "error" in r["profile"]:
                lines += [f"- profile failed: {_fmt(r['profile']['error'])}", ""]
            elif "profile" in r:
                p = r["profile"]
                lines += [f"### Profile: one {r['mode']} iteration, batch {r['batch']}, checkpointing "
                          f"{r['checkpointing']}", "", f"wall {_fmt(p['wall_seconds'])} s under the profiler, self CPU "
                          f"{_fmt(p['self_cpu_seconds'])} s, self GPU {_fmt(p['self_gpu_seconds'])} s, "
                          f"{p['aten_calls']} aten calls", "", "```", p["top_gpu"], p["top_cpu"], "```", ""]
    dc = report["sections"].get("dmd2_compile")
    if dc and dc.get("modes"):
        lines += ["## DMD2 iteration, shared mode, eager vs torch.compile (batch 1, checkpointing)", "",
                  "| compile | status | s / iteration | warm-up s (compile) | peak GiB | MFU |", "|---|" * 6]
        lines += [f"| {r['options'].get('compile_mode') or 'eager'} | {r['status']} | " + " | ".join(
            _fmt(r.get(k)) for k in ("seconds_per_iteration", "warmup_seconds", "peak_memory_gib", "mfu")) + " |"
            for r in dc["modes"]]
        lines += ["", *[f"- speed-up {mode} compile over eager: {_fmt(v)}x"
                        for mode, v in (dc.get("speedup_compiled_over_eager") or {}).items()],
                  *[f"- {_fmt(r['error'])}" for r in dc["modes"] if "error" in r], ""]
    for name, section in report["sections"].items():
        if section.get("status") not in ("ok", None) and "error" in section:
            lines += [f"## {name}: {section['status']}", "", "    " + section["error"], ""]
    return "\n".join(lines)


def write(report: dict, out_dir: Path) -> list[Path]:
    slug = (re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-") + ("-tiny" if TINY else "")
            + ("-rerun" if QUICK else ""))  # --quick never overwrites a full run's files
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"gpu-{slug}.json", out_dir / f"gpu-{slug}.md"]
    paths[0].write_text(json.dumps(report, indent=1, default=str) + "\n")
    paths[1].write_text(markdown(report) + "\n")
    if os.environ.get("OUT"):
        for p in paths:
            shutil.copy(p, Path(os.environ["OUT"]) / p.name)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny sizes, kernels interpreted")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--budget", type=float, default=1.0, help="scale every section's time budget")
    parser.add_argument("--quick", action="store_true",
                        help="the short rerun: kernel tests first, DMD2 at batch 1 with a profile (files *-rerun.*)")
    parser.add_argument("--sections", default=None,
                        help=f"comma-separated subset of {DEFAULT_SECTIONS} (run in the mode's order; default: all, "
                             "--tiny: all but dmd2_compile)")
    args = parser.parse_args(argv)
    sections = args.sections or (DEFAULT_SECTIONS.replace(",dmd2_compile", "") if args.tiny else DEFAULT_SECTIONS)
    wanted = [s.strip() for s in sections.split(",") if s.strip()]
    if unknown := [s for s in wanted if s not in BUDGET]:
        print(f"fewstep: error: unknown section {unknown[0]!r}; choose from {', '.join(BUDGET)}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cpu" and not args.tiny:
        print("fewstep: error: no CUDA device; run with --tiny for the CPU version", file=sys.stderr)
        return 2
    if args.tiny:
        torch.set_num_threads(1)

    def version(name):
        try:
            return __import__(name).__version__
        except Exception:
            return "not installed"

    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "triton": version("triton"), "diffusers": version("diffusers"),
              "peft": version("peft"), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "tiny": args.tiny,
              "sections": {}}
    # the kernel tests run in their own process, so a CUDA fault there harms nothing else
    # --quick: the kernel tests' messages first (one minute), then the DMD2 rows, each saved as it finishes

    def saver(name):  # rows are written as they finish, so a run cut short keeps them
        return lambda partial: (report["sections"].__setitem__(name, partial), write(report, args.out))

    runs = {"dmd2": lambda c: dmd2_bench(c, device, saver("dmd2")), "ops": lambda c: ops_bench(c, device),
            "kernel_tests": kernel_tests,
            "dmd2_compile": lambda c: dmd2_compile_bench(c, device, saver("dmd2_compile"))}
    order = ["kernel_tests", "dmd2", "ops"]  # the kernel tests' one minute first: their fix is unverified
    order.append("dmd2_compile")
    budgets = QUICK_BUDGET if args.quick else BUDGET
    total = Clock((QUICK_TOTAL if args.quick else TOTAL) * args.budget)
    paths = []
    for name in [n for n in order if n in wanted]:
        start = time.monotonic()
        print(f"gpu-check: {name} ...", flush=True)
        try:
            result = runs[name](Clock(min(budgets.get(name, BUDGET[name]) * args.budget, total.left())))
        except Exception as e:  # record and go on to the next section
            result = {"status": "error", "error": f"{type(e).__name__}: {e}"[:500],
                      "traceback": traceback.format_exc()[-2000:]}
        result["seconds"] = time.monotonic() - start
        report["sections"][name] = result
        report["mode"] = "quick" if args.quick else "full"
        paths = write(report, args.out)
        print(f"gpu-check: {name} {result['status']} in {result['seconds']:.0f} s", flush=True)
        gc.collect()
    print(markdown(report))
    print("written: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
