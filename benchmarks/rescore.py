"""Score finished runs again over several independent sample sets, to see past one score's noise.

    python -m benchmarks.rescore runs=runs/quality/dmd2-grid25-s0,runs/quality/dmd2-4-grid25-s0 [sets=5] [num=20000]

Each run (a mixture teacher's, exact or ``teacher=checkpoint`` of one) is sampled ``sets`` times with its own
sampling spec, ``num`` samples each, every set against fresh exact samples (the sweep's ``score`` at seeds 100,
101, ...). Prints each set's energy distance, their mean and its standard error. The single 20000-sample scores of
one grid25 student differ by up to 2× (docs/methods/quality.md, thirteenth pass).
"""

from __future__ import annotations

import sys

import torch

from benchmarks.quality import _quiet_torch, score
from core.cli import guard
from core.errors import UsageError
from core.generation import generate
from plugins.gmm_quality import exact_mixture

USAGE = "usage: python -m benchmarks.rescore runs=RUN_DIR[,RUN_DIR...] [sets=5] [num=20000]"


def rescore(run: str, sets: int, num: int) -> list[float]:
    """The energy distance of ``sets`` independent ``num``-sample draws of ``run``'s sampler."""
    from core.rundir import load_run

    nets, spec, _ = load_run(run)
    student, teacher = nets.student.eval(), nets.teacher
    mixture = exact_mixture(teacher)
    if not hasattr(mixture, "sample_exact"):
        raise UsageError(f"run={run} has no exact mixture to score against; rescore runs of teacher=gmm, or of "
                         "teacher=checkpoint on a gmm-trained network")

    def sample(n, labels):
        cond = None if labels is None else teacher.encode_condition(labels)
        return generate(student, spec, n, cond, shape=teacher.data_shape)

    with torch.no_grad():
        return [score(mixture, sample, num, 100 + j)["energy_distance"] for j in range(sets)]


@guard
def main(argv: list[str]) -> int:
    _quiet_torch()
    opts = dict(a.split("=", 1) for a in argv if "=" in a)
    if "runs" not in opts or set(opts) - {"runs", "sets", "num"} or len(opts) != len(argv):
        raise UsageError(USAGE)
    try:
        sets, num = int(opts.get("sets", 5)), int(opts.get("num", 20000))
    except ValueError:
        raise UsageError(f"sets and num take integers; {USAGE}") from None
    if sets < 2 or num < 2:
        raise UsageError(f"sets and num must be at least 2 (a standard error needs two sets); {USAGE}")
    print("| run | energy distance: mean ± s.e. | sets |")
    print("|---|---|---|")
    for run in (r for r in opts["runs"].split(",") if r):
        eds = torch.tensor(rescore(run, sets, num), dtype=torch.float64)
        sem = float(eds.std() / sets ** 0.5)
        print(f"| {run} | {float(eds.mean()):.5f} ± {sem:.5f} | {' '.join(f'{e:.5f}' for e in eds.tolist())} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
