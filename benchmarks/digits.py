"""The digits table: a pixel UNet teacher on real handwritten digits, its samplers, and every student.

    python -m benchmarks.digits            # the full table (<= 90 min on 2 idle CPU cores)
    python -m benchmarks.digits --quick    # shorter distillations, fewer samples
    python -m benchmarks.digits --seeds 3  # three seeds per student (about 3x the distillation time)
    python -m benchmarks.digits --quick --students dmd2,dmd2-4step   # rerun only those rows

Trains the teacher once (``objective=denoise data=digits student=unet``; reused when ``--work`` holds it),
scores the teacher's samplers at NFE 1-32 and each student at its NFE with the digits FID
(``plugins.digits.fid``), writes ``benchmarks/results/digits[-quick].json``, one labelled sample grid
per row under ``docs/methods/digits/`` and the table between the markers in ``docs/methods/digits.md``.
Every row draws the same balanced labels (``num // 10`` per class) from the same seed. With ``--students``
and a saved JSON of the same size and sample count, only the named students are rerun: the teacher rows and
the other students are kept from the JSON, and the rerun is recorded under ``reruns``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from core import files
from core.preview import class_grid_png
from core.protocols import SamplingSpec
from core.timesteps import make_grid

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "methods" / "digits.md"
SAMPLERS = ("euler", "heun", "dpmpp-2m", "dpmpp-3m", "ancestral")
NFES = (1, 2, 4, 8, 16, 32)

# DMD2's 1-step row on this teacher (measured: docs/methods/digits.md, "DMD2 1-step"): the generator conditioned
# at sigma = 2.5 (DMD2's SDXL 1-step recipe conditions at t = 399, not 999), one critic update per generator update,
# lr 5e-4, and the regression on the teacher's ODE pairs weighted 10 against the DM loss (DMD's loss, regression-led)
DMD2_ONE_STEP = ["objective.timesteps=[2.5]", "objective.critic_updates=1", "objective.lr=5e-4",
                 "objective.regression_weight=10"]
# (row name, NFEs it is scored at, overrides, train.steps full / quick)
STUDENTS = [
    ("dmd2", (1,), ["objective=dmd2", *DMD2_ONE_STEP], 400, 150),
    ("dmd2-4step", (4,), ["objective=dmd2", "objective.steps=4"], 400, 150),
    ("sfd-nfe2", (2,), ["objective=sfd", "objective.nfe=2"], 200, 100),
    ("sfd-nfe3", (3,), ["objective=sfd", "objective.nfe=3"], 200, 100),
    ("sfd-v", (2, 3, 4, 5), ["objective=sfd-v", "student=copy-nfe"], 300, 120),
    ("mm", (4,), ["objective=mm"], 400, 150),
    ("mm-param", (4,), ["objective=mm-param"], 400, 150),
]
TEACHER = ["objective=denoise", "data=digits", "student=unet"]
# --quick only: extra overrides per row (none at present)
QUICK_OVERRIDES: dict[str, list[str]] = {}


def heun_steps(nfe: int) -> int:
    """Heun spends 2 calls per step but 1 on the step into 0: NFE = 2 steps - 1."""
    return max(1, (nfe + 1) // 2)


def train(overrides: list[str], out: Path) -> float:
    """Train a run in this process; returns its wall time. A run already trained by an earlier call is
    reused, with the wall time recorded then (``timing.json`` in the run dir)."""
    from core.config import parse_overrides
    from core.runconfig import resolve
    from core.runner import Trainer

    timing = out / "timing.json"
    if timing.exists() and (out / "student.safetensors").exists():
        return json.loads(timing.read_text())["wall_s"]  # finished: not even resumed (its config may be older)
    start = time.perf_counter()
    Trainer(resolve(parse_overrides([*overrides, f"out={out}", "train.progress=false"]))).train()
    if timing.exists():
        return json.loads(timing.read_text())["wall_s"]
    wall = time.perf_counter() - start
    timing.write_text(json.dumps({"wall_s": wall}))
    return wall


def balanced_labels(num: int) -> torch.Tensor:
    return torch.arange(num) % 10


@torch.no_grad()
def score(model, spec: SamplingSpec, shape, num: int, seed: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    from core.generation import generate
    from plugins.digits.fid import digits_report

    labels = balanced_labels(num)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        samples = generate(model, spec, num, labels, batch=500, shape=shape)
    return digits_report(samples, labels), samples, labels


def save_grid(samples, labels, name: str, grids: Path) -> str:
    grids.mkdir(parents=True, exist_ok=True)
    path = grids / f"{name}.png"
    files.write_bytes_atomic(str(path), class_grid_png(samples, labels, per_row=8, scale=3))
    return str(path.relative_to(DOC.parent))


def teacher_rows(teacher_run: Path, num: int, grids: Path) -> list[dict]:
    from plugins.checkpoint_teacher import CheckpointTeacher, CheckpointTeacherConfig

    teacher = CheckpointTeacher(CheckpointTeacherConfig(path=str(teacher_run)))
    rows = []
    for sampler in SAMPLERS:
        for nfe in NFES:
            steps = heun_steps(nfe) if sampler == "heun" else nfe
            spec = SamplingSpec(sampler, make_grid(teacher.schedule, steps).tolist(), {})
            real_nfe = 2 * steps - 1 if sampler == "heun" else steps
            if any(r["sampler"] == sampler and r["nfe"] == real_nfe for r in rows):
                continue  # heun at NFE 1 and 2 is the same single Euler step
            report, samples, labels = score(teacher, spec, teacher.data_shape, num, seed=0)
            name = f"teacher-{sampler}-nfe{real_nfe}"
            rows.append({"row": name, "model": "teacher", "sampler": sampler, "nfe": real_nfe, **report,
                         "grid": save_grid(samples, labels, name, grids)})
            print(f"{name:<28} FID {report['fid']:8.2f}  acc {report['class_accuracy']:.3f}  "
                  f"min share {report['min_class_share']:.3f}", flush=True)
    return rows


def student_rows(teacher_run: Path, work: Path, size: int, num: int, seeds: int, quick: bool,
                 grids: Path, only: set | None) -> list[dict]:
    from core.rundir import load_run

    rows = []
    for name, nfes, overrides, full_steps, quick_steps in STUDENTS:
        if only and name not in only:
            continue
        steps = quick_steps if quick else full_steps
        overrides = [*overrides, *QUICK_OVERRIDES.get(name, [])] if quick else overrides
        per_seed: dict[int, list] = {nfe: [] for nfe in nfes}
        for seed in range(seeds):
            out = work / ("quick" if quick else "full") / f"{name}-seed{seed}"
            wall = train([*overrides, "teacher=checkpoint", f"teacher.path={teacher_run}", "data=digits",
                          f"data.size={size}", f"train.steps={steps}", f"seed={seed}"], out)
            networks, spec, _ = load_run(str(out))
            for nfe in nfes:
                with_steps = getattr(networks.objective, "with_steps", None)
                s = with_steps(spec, nfe, networks.student) if with_steps and len(nfes) > 1 else spec
                report, samples, labels = score(networks.student, s, networks.teacher.data_shape, num, seed=seed)
                row = f"{name}-nfe{nfe}" if len(nfes) > 1 else name
                grid = save_grid(samples, labels, row, grids) if seed == 0 else None
                per_seed[nfe].append({**report, "wall_s": wall, "steps": steps, "seed": seed, "grid": grid})
                print(f"{row:<28} seed {seed} FID {report['fid']:8.2f}  acc {report['class_accuracy']:.3f}  "
                      f"min share {report['min_class_share']:.3f}  ({wall:.0f} s)", flush=True)
        for nfe, runs in per_seed.items():
            row = f"{name}-nfe{nfe}" if len(nfes) > 1 else name
            fids = [r["fid"] for r in runs]
            rows.append({"row": row, "model": name, "sampler": spec.sampler, "nfe": nfe,
                         "fid": statistics.mean(fids), "fid_sd": statistics.stdev(fids) if len(fids) > 1 else None,
                         "class_accuracy": statistics.mean(r["class_accuracy"] for r in runs),
                         "class_spread": statistics.mean(r["class_spread"] for r in runs),
                         "min_class_share": min(r["min_class_share"] for r in runs),
                         "wall_s": statistics.mean(r["wall_s"] for r in runs), "steps": steps,
                         "seeds": len(runs), "grid": runs[0]["grid"], "runs": runs})
    return rows


def table(result: dict) -> str:
    lines = [f"Run: `{result['command']}` on {result['machine']}, {result['date']} "
             f"({result['samples']} samples per row, data.size={result['size']}).",
             f"Floor (held-out real digits vs train): FID {result['floor']['fid']:.2f}, class accuracy "
             f"{result['floor']['class_accuracy']:.3f}, min class share {result['floor']['min_class_share']:.3f}. "
             f"Teacher training: {result['teacher_wall_s']:.0f} s.",
             *(f"Rerun of {', '.join(r['rows'])}: `{r['command']}` on {r['machine']}, {r['date']}."
               for r in result.get("reruns", [])), "",
             "| row | sampler | NFE | FID | class acc. | class spread | min class share | distil wall time | samples |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        fid = f"{r['fid']:.2f}" + (f" ± {r['fid_sd']:.2f}" if r.get("fid_sd") else "")
        wall = f"{r['wall_s']:.0f} s ({r['steps']} steps, {r['seeds']} seed{'s' * (r['seeds'] > 1)})" \
            if "wall_s" in r else "-"
        grid = f"![{r['row']}]({r['grid']})" if r.get("grid") else ""
        spread = f"{r['class_spread']:.2f}" if r.get("class_spread") is not None else "-"
        lines.append(f"| {r['row']} | {r['sampler']} | {r['nfe']} | {fid} | {r['class_accuracy']:.3f} | {spread} | "
                     f"{r['min_class_share']:.3f} | {wall} | {grid} |")
    return "\n".join(lines)


def goals(rows: list[dict]) -> list[dict]:
    """The issue's goals, measured: (goal, student value, target, met)."""
    def best(pred):
        found = [r["fid"] for r in rows if pred(r)]
        return min(found) if found else None

    def fid(row):
        return best(lambda r: r["row"] == row)

    teacher = lambda nfe, sampler=None: best(lambda r: r["model"] == "teacher" and r["nfe"] == nfe  # noqa: E731
                                             and sampler in (None, r["sampler"]))
    checks = [("DMD2 1-step FID <= teacher's best 8-NFE FID", fid("dmd2"), teacher(8)),
              ("SFD NFE 2 FID <= 1/2 x teacher's best 2-NFE FID", fid("sfd-nfe2"),
               None if teacher(2) is None else teacher(2) / 2),
              ("MM 4-step FID <= teacher's 4-step ancestral FID", fid("mm"), teacher(4, "ancestral")),
              ("MM-param 4-step FID <= teacher's 4-step ancestral FID", fid("mm-param"), teacher(4, "ancestral"))]
    out = [{"goal": g, "value": v, "target": t, "met": v <= t} for g, v, t in checks if v is not None and t]
    for r in rows:
        if r["model"] != "teacher":
            out.append({"goal": f"{r['row']}: min class share >= 0.05", "value": r["min_class_share"],
                        "target": 0.05, "met": r["min_class_share"] >= 0.05})
    return out


def goals_table(result: dict) -> str:
    lines = ["| goal | measured | target | met |", "|---|---|---|---|"]
    for g in result["goals"]:
        lines.append(f"| {g['goal']} | {g['value']:.3g} | {g['target']:.3g} | {'yes' if g['met'] else '**no**'} |")
    return "\n".join(lines)


def write_doc(text: str, marker: str) -> None:
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    doc = DOC.read_text()
    if start not in doc:
        raise SystemExit(f"{DOC} lacks the markers {start} ... {end}")
    head, rest = doc.split(start, 1)
    DOC.write_text(f"{head}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")


def render(result: dict, suffix: str) -> None:
    result["goals"] = goals(result["rows"])
    write_doc(table(result) + "\n\nGoals, measured in this table:\n\n" + goals_table(result), f"digits-table{suffix}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short distillations, one seed, 500 samples per row")
    p.add_argument("--size", type=int, default=8, help="data.size (8, 16 or 32)")
    p.add_argument("--work", default="runs/digits-bench", help="where the runs go (the teacher is reused)")
    p.add_argument("--seeds", type=int, default=1, help="student seeds (3 do not fit the 90-min budget)")
    p.add_argument("--samples", type=int, default=None, help="samples per row (default 1000, --quick 500)")
    p.add_argument("--students", default="", help="comma-separated students to run (default: all); with a saved "
                   "JSON, only these are rerun and the other rows kept")
    p.add_argument("--teacher-overrides", default="", help="extra key=value for the teacher run, comma-separated")
    p.add_argument("--render", action="store_true", help="only rewrite the doc's table from the saved JSON")
    args = p.parse_args(argv)
    os.environ.setdefault("FEWSTEP_TENSORBOARD", "0")
    suffix = "-quick" if args.quick else ""
    out = ROOT / "benchmarks" / "results" / f"digits{suffix}.json"
    if args.render:
        render(json.loads(out.read_text()), suffix)
        return 0
    from plugins.digits.fid import floor_report

    seeds = args.seeds
    num = args.samples or (500 if args.quick else 1000)
    work = Path(args.work)
    grids = DOC.parent / "digits" / f"size{args.size}{suffix}"
    teacher_run = work / f"teacher-size{args.size}"
    extra = [o for o in args.teacher_overrides.split(",") if o]
    teacher_wall = train([*TEACHER, f"data.size={args.size}", *extra], teacher_run)
    only = {s for s in args.students.split(",") if s} or None
    command = "python -m benchmarks.digits " + " ".join(argv if argv is not None else os.sys.argv[1:])
    machine = f"{platform.machine()} CPU, torch threads {torch.get_num_threads()}"
    saved = json.loads(out.read_text()) if only and out.exists() else None
    if saved and (saved["size"], saved["samples"]) == (args.size, num):
        new = student_rows(teacher_run, work, args.size, num, seeds, args.quick, grids, only)
        result = saved
        order = {"teacher": -1, **{name: i for i, (name, *_) in enumerate(STUDENTS)}}
        kept = [r for r in saved["rows"] if r["model"] not in only]
        result["rows"] = sorted(kept + new, key=lambda r: order.get(r["model"], len(order)))  # stable
        result.setdefault("reruns", []).append({"rows": sorted(only), "command": command, "machine": machine,
                                                "date": time.strftime("%Y-%m-%d")})
    else:
        rows = teacher_rows(teacher_run, num, grids)
        rows += student_rows(teacher_run, work, args.size, num, seeds, args.quick, grids, only)
        result = {"command": command, "machine": machine, "date": time.strftime("%Y-%m-%d"), "size": args.size,
                  "samples": num, "floor": floor_report(args.size), "teacher_wall_s": teacher_wall, "rows": rows}
    result["goals"] = goals(result["rows"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    render(result, suffix)
    print(f"wrote {out} and the table in {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
