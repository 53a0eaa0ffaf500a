"""Distillation quality sweep: every objective x mixture x seed, against the exact teacher's own samplers.

    python -m benchmarks.quality                                   # every variant x the four presets x seeds 0 1 2
    python -m benchmarks.quality --variants dmd2,mm --presets ring8 --seeds 0 --jobs 2
    python -m benchmarks.quality teacher.spec=my_mixture.json       # your own mixture instead of the presets
    python -m benchmarks.quality --variants dmd2 objective.critic_updates=10   # extra overrides for every run

Each run trains with the objective's defaults (what a user gets from ``python -m core.run objective=NAME``),
then draws ``--samples`` samples and scores them against as many exact samples with
``plugins.gmm_quality.mixture_quality``: energy distance, mode-mass TV, lost modes, off-manifold share.
The exact teacher's Euler, DPM-Solver++(2M) and ancestral samplers at NFE 1, 2, 4, 8 are the references.
Variants that need a network teacher (``mm-param``, ``sfd``) distil a ``denoise``-trained MLP of the mixture
(trained once per mixture in the work dir) and are scored against the exact mixture all the same; ``sfd-1``
(SFD's second stage) distils an ``sfd-v`` model of that MLP (also trained once per mixture).
``cls4`` runs with guidance 3 (teacher.guidance) and is scored against exact class samples, so its rows measure
class correctness and balance rather than a guided law (docs/methods/quality.md).

Writes ``--json`` (every run and the per-variant means) and the table between the markers in ``--table``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import re
import statistics
import sys
import time
from pathlib import Path

PRESETS = ("ring8", "grid25", "hd16", "cls4")
GUIDANCE = {"cls4": 3.0}
NETWORK_TEACHER = ("objective=denoise", "train.steps=1500", "train.batch=512", "seed=0")
FIRST_STAGE = ("objective=sfd-v",)  # SFD's second stage distils an SFD-v model of the network teacher
VARIANTS = {  # name -> (overrides, teacher: None = the exact mixture, "network", or "first-stage")
    "dmd2": (("objective=dmd2",), None),
    "dmd2-4": (("objective=dmd2", "objective.steps=4"), None),
    "mm": (("objective=mm",), None),
    "mm-3x": (("objective=mm", "train.steps=6000"), None),
    "mm-param": (("objective=mm-param",), "network"),
    "mm-param-3x": (("objective=mm-param", "train.steps=6000"), "network"),
    "sfd": (("objective=sfd",), "network"),
    "sfd-1": (("objective=sfd-1",), "first-stage"),
}
NETWORK_ONLY = ("objective=mm-param", "objective=sfd", "student=copy")  # variants that distil a network teacher
SAMPLERS = ("euler", "dpmpp-2m", "ancestral", "ancestral-refine")
NFES = (1, 2, 4, 8)
METRICS = ("energy_distance", "mode_mass_tv", "lost_modes", "off_manifold")
TABLE_START, TABLE_END = "<!-- quality-table:start -->", "<!-- quality-table:end -->"


# -- one run (in a worker process) -------------------------------------------------------------------------

def _quiet_torch():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("FEWSTEP_TENSORBOARD", "0")
    import torch

    torch.set_num_threads(1)
    return torch


def mixture_overrides(mixture: str, spec: str | None) -> list[str]:
    if spec:
        return ["teacher=gmm", f"teacher.spec={spec}"]
    return ["teacher=gmm", f"teacher.preset={mixture}", *([f"teacher.guidance={GUIDANCE[mixture]}"]
                                                          if mixture in GUIDANCE else [])]


def _train(overrides: list[str]):
    from core.config import parse_overrides
    from core.runconfig import resolve
    from core.runner import Trainer

    trainer = Trainer(resolve(parse_overrides(["train.progress=false", *overrides])), log=lambda msg: None)
    trainer.train()
    return trainer


def labels_for(mixture, n: int):
    import torch

    return torch.arange(n) % mixture.num_classes if getattr(mixture, "num_classes", 0) else None


def draw(mixture, sample_fn, n: int, seed: int):
    """(samples, exact samples, labels): ``sample_fn(n, labels)`` under seed ``seed``, the exact ones under seed
    + 1000, both for the same labels (every class in turn for a class-conditional mixture, else None)."""
    import torch

    labels = labels_for(mixture, n)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x = sample_fn(n, labels)
        torch.manual_seed(seed + 1000)
        ref = mixture.sample_exact(n, labels)
    return x, ref, labels


def score(mixture, sample_fn, n: int, seed: int) -> dict:
    """Samples from ``sample_fn(n, labels)`` under seed ``seed``, scored against exact samples (seed + 1000)."""
    from plugins.gmm_quality import mixture_quality

    x, ref, labels = draw(mixture, sample_fn, n, seed)
    return mixture_quality(mixture, x, ref, labels)


def teacher_spec(teacher, sampler: str, nfe: int):
    """The teacher sampler's spec at ``nfe`` calls: ancestral on the uniform fraction grid it is defined on
    (``ancestral-refine``: on MM's default grid, ``core.timesteps.step_fraction``), the ODE solvers on the
    schedule's default grid."""
    from core.protocols import SamplingSpec
    from core.timesteps import fraction_grid, make_grid

    if sampler.startswith("ancestral"):
        grid = fraction_grid(teacher.schedule, nfe, refine=sampler == "ancestral-refine")
        return SamplingSpec("ancestral", grid.tolist(), {})
    return SamplingSpec(sampler, make_grid(teacher.schedule, nfe).tolist(), {})


def spec_nfe(spec) -> int:
    """Network calls of a sampling spec: one per interval, none for an AFS first step."""
    return len(spec.times) - 1 - int(bool(spec.options.get("afs")))


def run_job(job: dict) -> dict:
    torch = _quiet_torch()
    from core.generation import generate

    out = Path(job["workdir"]) / job["name"]
    overrides = [*job["overrides"], f"seed={job['seed']}", f"out={out}", "train.eval_every=0",
                 "train.preview_every=0"]
    if job["teacher_dir"]:
        overrides += ["teacher=checkpoint", f"teacher.path={job['teacher_dir']}"]
        overrides += [f"teacher.guidance={g}" for g in job["guidance"]]
    t0 = time.perf_counter()
    trainer = _train(overrides)
    seconds = time.perf_counter() - t0
    from plugins.gmm_quality import exact_mixture

    teacher = trainer.teacher
    mixture = exact_mixture(teacher)  # a checkpoint teacher is scored against its exact mixture
    student = trainer.sampling_model()

    def sample(n, labels):
        cond = None if labels is None else teacher.encode_condition(labels)
        return generate(student, trainer.spec, n, cond, shape=teacher.data_shape)

    with torch.no_grad():
        metrics = score(mixture, sample, job["samples"], 7 + job["seed"])
    return {"variant": job["variant"], "mixture": job["mixture"], "seed": job["seed"], **metrics,
            "nfe": spec_nfe(trainer.spec),
            "train_steps": trainer.cfg.train.steps,
            "train_seconds": round(seconds, 1)}


def _cost(overrides) -> float:
    steps = next((float(o.split("=")[1]) for o in overrides if o.startswith("train.steps=")), 2000.0)
    k = next((float(o.split("=")[1]) for o in overrides if o.startswith("objective.steps=")), 1.0)
    return steps * (1 + 0.3 * k)


def network_teacher(workdir: Path, mixture: str, spec: str | None) -> str:
    out = workdir / f"teacher-{mixture}"
    _train([*mixture_overrides(mixture, spec), *NETWORK_TEACHER, f"out={out}", "train.eval_every=0",
            "train.preview_every=0"])
    return str(out)


def first_stage(workdir: Path, mixture: str, teacher_dir: str) -> str:
    _quiet_torch()
    out = workdir / f"sfd-v-{mixture}"
    _train([*FIRST_STAGE, "teacher=checkpoint", f"teacher.path={teacher_dir}", "seed=0", f"out={out}",
            "train.eval_every=0", "train.preview_every=0"])
    return str(out)


# -- teacher references -------------------------------------------------------------------------------------

def teacher_rows(mixture_name: str, spec: str | None, seeds: list[int], n: int) -> list[dict]:
    torch = _quiet_torch()
    from core.generation import generate
    from plugins.gmm import GaussianMixtureTeacher, GMMConfig

    config = GMMConfig(spec=spec) if spec else GMMConfig(preset=mixture_name, guidance=GUIDANCE.get(mixture_name, 1.0))
    teacher = GaussianMixtureTeacher(config)
    guidance = teacher.guidance if teacher.num_classes else None
    rows = []
    for sampler in SAMPLERS:
        for nfe in NFES:
            spec_ = teacher_spec(teacher, sampler, nfe)
            for seed in seeds:
                def sample(k, labels):
                    extra = {} if guidance is None else {"guidance": guidance}
                    return generate(teacher, spec_, k, labels, shape=teacher.data_shape, **extra)

                with torch.no_grad():
                    m = score(teacher, sample, n, 7 + seed)
                rows.append({"variant": f"teacher {sampler}", "mixture": mixture_name, "seed": seed, "nfe": nfe, **m})
    return rows


# -- aggregation and the table -------------------------------------------------------------------------------

def aggregate(rows: list[dict]) -> list[dict]:
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["variant"], r["mixture"], r["nfe"]), []).append(r)
    out = []
    for (variant, mixture, nfe), rs in groups.items():
        agg = {"variant": variant, "mixture": mixture, "nfe": nfe, "seeds": sorted(r["seed"] for r in rs)}
        for m in METRICS:
            vals = [float(r[m]) for r in rs]
            agg[m] = statistics.fmean(vals)
            agg[m + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        agg["lost_modes_max"] = max(int(r["lost_modes"]) for r in rs)
        out.append(agg)
    return out


def lookup(agg: list[dict], variant: str, mixture: str, nfe: int | None = None) -> dict | None:
    for a in agg:
        if a["variant"] == variant and a["mixture"] == mixture and (nfe is None or a["nfe"] == nfe):
            return a
    return None


def goals(agg: list[dict], mixtures: list[str]) -> list[dict]:
    """The issue's goals that the rows at hand can decide (docs/methods/quality.md)."""
    out = []

    def check(name, mixture, ok, detail):
        out.append({"goal": name, "mixture": mixture, "pass": bool(ok), "detail": detail})

    for mx in mixtures:
        d1, d4 = lookup(agg, "dmd2", mx), lookup(agg, "dmd2-4", mx)
        e4, e8 = lookup(agg, "teacher euler", mx, 4), lookup(agg, "teacher euler", mx, 8)
        a4, r4 = lookup(agg, "teacher ancestral", mx, 4), lookup(agg, "teacher ancestral-refine", mx, 4)
        if d1:
            check("dmd2 1-step: no lost mode", mx, d1["lost_modes_max"] == 0, f"max lost {d1['lost_modes_max']}")
            if e8 and mx in ("ring8", "grid25"):
                check("dmd2 1-step <= teacher euler 8", mx, d1["energy_distance"] <= e8["energy_distance"],
                      f"{d1['energy_distance']:.5f} vs {e8['energy_distance']:.5f}")
        if d4:
            check("dmd2 4-step: no lost mode", mx, d4["lost_modes_max"] == 0, f"max lost {d4['lost_modes_max']}")
            if d1:
                check("dmd2 4-step <= 1/2 dmd2 1-step", mx, d4["energy_distance"] <= 0.5 * d1["energy_distance"],
                      f"{d4['energy_distance']:.5f} vs {d1['energy_distance']:.5f}")
            if e4:
                check("dmd2 4-step <= teacher euler 4", mx, d4["energy_distance"] <= e4["energy_distance"],
                      f"{d4['energy_distance']:.5f} vs {e4['energy_distance']:.5f}")
        mm, mm3 = lookup(agg, "mm", mx), lookup(agg, "mm-3x", mx)
        if mm:
            check("mm 4-step: no lost mode", mx, mm["lost_modes_max"] == 0, f"max lost {mm['lost_modes_max']}")
            if a4:
                check("mm 4-step <= teacher ancestral 4", mx, mm["energy_distance"] <= a4["energy_distance"],
                      f"{mm['energy_distance']:.5f} vs {a4['energy_distance']:.5f}")
            if r4:  # the same bar on the student's own grid (grid=refine), where the teacher is better too
                check("mm 4-step <= teacher ancestral 4 on mm's grid", mx,
                      mm["energy_distance"] <= r4["energy_distance"],
                      f"{mm['energy_distance']:.5f} vs {r4['energy_distance']:.5f}")
            if mm3:
                check("mm after 3x training no worse (no drift)", mx, mm3["energy_distance"] <= mm["energy_distance"],
                      f"{mm3['energy_distance']:.5f} vs {mm['energy_distance']:.5f}")
        mp, mp3 = lookup(agg, "mm-param", mx), lookup(agg, "mm-param-3x", mx)
        if mp and mp3:
            check("mm-param after 3x training no worse", mx, mp3["energy_distance"] <= mp["energy_distance"],
                  f"{mp3['energy_distance']:.5f} vs {mp['energy_distance']:.5f}")
        sfd1 = lookup(agg, "sfd-1", mx)
        if sfd1 and e4:
            check("sfd 1-NFE <= teacher euler 4", mx, sfd1["energy_distance"] <= e4["energy_distance"],
                  f"{sfd1['energy_distance']:.5f} vs {e4['energy_distance']:.5f}")
    return out


def markdown(agg: list[dict], goal_rows: list[dict], meta: dict) -> str:
    samples = f"{meta['samples']} samples" if meta.get("samples") else "the samples of each sweep"
    if meta.get("samples") and meta.get("teacher_samples", meta["samples"]) != meta["samples"]:
        samples += f" ({meta['teacher_samples']} for the teacher's samplers)"
    lines = [f"Measured {meta['date']} with `{meta['command']}` ({samples} per run; mean ± std over the seeds "
             "listed; lost = the most lost modes of any seed).",
             "", "| mixture | sampler / objective | NFE | seeds | energy distance | mode-mass TV | lost | off-manifold |",
             "|---|---|---|---|---|---|---|---|"]
    order = {v: i for i, v in enumerate([f"teacher {s}" for s in SAMPLERS] + list(VARIANTS) + ["sfd-1"])}
    for a in sorted(agg, key=lambda a: (a["mixture"], order.get(a["variant"], 99), a["nfe"])):
        name = a["variant"] if a["variant"].startswith("teacher") else f"**{a['variant']}**"
        lines.append(f"| {a['mixture']} | {name} | {a['nfe']} | {','.join(map(str, a['seeds']))} | "
                     f"{a['energy_distance']:.5f} ± "
                     f"{a['energy_distance_std']:.5f} | {a['mode_mass_tv']:.3f} ± {a['mode_mass_tv_std']:.3f} | "
                     f"{a['lost_modes_max']} | {a['off_manifold']:.3f} ± {a['off_manifold_std']:.3f} |")
    if goal_rows:
        lines += ["", "| goal | mixture | result | numbers |", "|---|---|---|---|"]
        lines += [f"| {g['goal']} | {g['mixture']} | {'pass' if g['pass'] else '**miss**'} | {g['detail']} |"
                  for g in goal_rows]
    return "\n".join(lines)


def write_table(path: Path, text: str) -> None:
    doc = path.read_text() if path.exists() else f"# Quality sweep\n\n{TABLE_START}\n{TABLE_END}\n"
    if TABLE_START not in doc:
        doc += f"\n{TABLE_START}\n{TABLE_END}\n"
    head, rest = doc.split(TABLE_START, 1)
    tail = rest.split(TABLE_END, 1)[1] if TABLE_END in rest else ""
    path.write_text(f"{head}{TABLE_START}\n{text}\n{TABLE_END}{tail}")


# -- driver -------------------------------------------------------------------------------------------------

def report(rows: list[dict], mixtures: list[str], meta: dict, args) -> None:
    agg = aggregate(rows)
    goal_rows = goals(agg, mixtures)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "runs": rows, "summary": agg, "goals": goal_rows}, indent=1))
    text = markdown(agg, goal_rows, meta)
    if args.table:
        write_table(Path(args.table), text)
    print(text)


def collect(args, argv) -> int:
    rows, seen = [], set()
    for path in args.collect:
        if not Path(path).is_file():
            print(f"fewstep: error: --collect: no such file '{path}'; pass the .rows.jsonl files of earlier sweeps",
                  file=sys.stderr)
            return 2
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            key = (row["variant"], row["mixture"], row["seed"], row["nfe"])
            if key not in seen:  # the first file that has a run wins (teacher rows repeat across sweeps)
                seen.add(key)
                rows.append(row)
    mixtures = sorted({r["mixture"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    meta = {"date": time.strftime("%Y-%m-%d"), "seeds": seeds, "samples": None,
            "command": "python -m benchmarks.quality " + " ".join(argv if argv is not None else sys.argv[1:])}
    report(rows, mixtures, meta, args)
    return 0


def bad_arguments(args) -> str | None:
    """What is wrong with the sweep's options, in one line with its fix, or None."""
    for flag, value in (("--samples", args.samples), ("--teacher-samples", args.teacher_samples),
                        ("--jobs", args.jobs)):
        if value < 1:
            return f"{flag} must be a positive number, got {value}"
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        seeds = []
    if not seeds:
        return f"--seeds takes integers separated by commas, got '{args.seeds}'; e.g. --seeds 0,1,2"
    unknown = [m for m in args.presets.split(",") if m and m not in PRESETS]
    if unknown and not args.collect:
        return (f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}, "
                "or pass your own mixture as teacher.spec=FILE.json")
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run; teacher.spec=FILE replaces "
                                                "the presets with your mixture")
    p.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "sfd"))
    p.add_argument("--define", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="an extra variant for ablations, e.g. dmd2-reg:objective=dmd2,objective.regression_weight=1")
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--teacher-samples", type=int, default=None,
                   help="samples per teacher-sampler score (default: --samples); the runs' scores at 20000 samples "
                        "resolve distances near 0.001, the teacher's few-step samplers need no more than 5000")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workdir", default="runs/quality")
    p.add_argument("--json", default="benchmarks/results/quality.json")
    p.add_argument("--table", default="docs/methods/quality.md", help="'' to skip")
    p.add_argument("--collect", nargs="+", metavar="ROWS.jsonl",
                   help="train nothing: aggregate the rows files of earlier (partial) sweeps into --json and --table")
    args = p.parse_args(argv)
    args.teacher_samples = args.samples if args.teacher_samples is None else args.teacher_samples
    problem = bad_arguments(args)
    if problem:
        print(f"fewstep: error: {problem}", file=sys.stderr)
        return 2
    if args.collect:
        return collect(args, argv)
    spec = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("teacher.spec=")), None)
    extra = [o for o in args.overrides if not o.startswith("teacher.spec=")]
    table = dict(VARIANTS)
    for d in args.define:
        name, _, body = d.partition(":")
        if not name or "=" not in body:
            print(f"fewstep: error: --define '{d}' is not NAME:KEY=VALUE[,KEY=VALUE...]", file=sys.stderr)
            return 2
        overrides = tuple(re.split(r",(?=[\w.]+=)", body))  # a comma starts a new KEY= only: lists stay whole
        table[name] = (overrides, "first-stage" if "objective=sfd-1" in overrides
                       else "network" if any(o.startswith(NETWORK_ONLY) for o in overrides) else None)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in table]
    if unknown:
        print(f"fewstep: error: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(table)}",
              file=sys.stderr)
        return 2
    if spec and not Path(spec).is_file():
        print(f"fewstep: error: teacher.spec: no such file '{spec}'; pass a JSON mixture file", file=sys.stderr)
        return 2
    mixtures = [Path(spec).stem] if spec else [m for m in args.presets.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    t0 = time.perf_counter()
    with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        teachers, stages = {}, {}
        if any(table[v][1] for v in variants):
            teachers = {m: pool.submit(network_teacher, workdir, m, spec) for m in mixtures}
        refs = [pool.submit(teacher_rows, m, spec, seeds, args.teacher_samples) for m in mixtures]
        if any(table[v][1] == "first-stage" for v in variants):
            stages = {m: pool.submit(first_stage, workdir, m, teachers[m].result()) for m in mixtures}
        jobs = []
        for v in variants:
            overrides, needs_net = table[v]
            for m in mixtures:
                base = [*(mixture_overrides(m, spec) if not needs_net else []), *overrides, *extra]
                for s in seeds:
                    jobs.append({"variant": v, "mixture": m, "seed": s, "overrides": base, "samples": args.samples,
                                 "name": f"{v}-{m}-s{s}", "workdir": str(workdir), "teacher_dir": None,
                                 "guidance": [GUIDANCE[m]] if m in GUIDANCE and not spec else [],
                                 "needs_net": needs_net})
        futures = []
        jobs.sort(key=lambda j: -_cost(j["overrides"]))  # longest first, for the pool's balance
        for job in jobs:
            if job["needs_net"]:
                source = stages if job["needs_net"] == "first-stage" else teachers
                job["teacher_dir"] = source[job["mixture"]].result()
            futures.append(pool.submit(run_job, job))
        rows = [r for f in refs for r in f.result()]
        progress = Path(args.json).with_suffix(".rows.jsonl")  # every finished run at once, for long sweeps
        progress.parent.mkdir(parents=True, exist_ok=True)
        progress.write_text("".join(json.dumps(r) + "\n" for r in rows))
        for f in cf.as_completed(futures):
            row = f.result()
            rows.append(row)
            with progress.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"{row['variant']:>8} {row['mixture']:>8} seed {row['seed']}: ED {row['energy_distance']:.5f} "
                  f"TV {row['mode_mass_tv']:.3f} lost {row['lost_modes']} off {row['off_manifold']:.3f} "
                  f"({row['train_seconds']} s)", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "seeds": seeds, "samples": args.samples,
            "teacher_samples": args.teacher_samples,
            "command": "python -m benchmarks.quality " + " ".join(argv if argv is not None else sys.argv[1:]),
            "wall_seconds": round(time.perf_counter() - t0, 1), "jobs": args.jobs}
    report(rows, mixtures, meta, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
