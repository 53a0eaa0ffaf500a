"""How much the digits FID moves with the sampling seed alone: the DMD2 1-step row and the teacher's dpmpp-2m at
8 NFE (the goal's pair in docs/methods/digits.md), each scored like the table (1000 balanced samples) with seeds
0..N-1, after ``python -m benchmarks.digits --work WORK`` has trained them.

    python -m benchmarks.digits_fid_noise --work runs/digits-bench [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.digits import score
from core.protocols import SamplingSpec
from core.rundir import load_run
from core.timesteps import make_grid


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/digits-bench")
    p.add_argument("--size", type=int, default=8)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--samples", type=int, default=1000)
    args = p.parse_args(argv)
    from plugins.checkpoint_teacher import CheckpointTeacher, CheckpointTeacherConfig

    work = Path(args.work)
    teacher = CheckpointTeacher(CheckpointTeacherConfig(path=str(work / f"teacher-size{args.size}")))
    networks, spec, _ = load_run(str(work / "full" / "dmd2-seed0"))
    solver = SamplingSpec("dpmpp-2m", make_grid(teacher.schedule, 8).tolist(), {})
    result = {}
    for name, model, s in [("dmd2", networks.student, spec), ("teacher-dpmpp-2m-nfe8", teacher, solver)]:
        fids = [score(model, s, teacher.data_shape, args.samples, seed=seed)[0]["fid"] for seed in range(args.seeds)]
        result[name] = fids
        print(f"{name:<24} FID {statistics.mean(fids):.2f} ± {statistics.stdev(fids):.2f} over seeds "
              + ", ".join(f"{f:.2f}" for f in fids))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
