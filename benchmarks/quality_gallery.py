"""A picture of a quality sweep: one scatter per 2-D mixture and sampler or objective, next to exact samples.

    python -m benchmarks.quality_gallery workdir=runs/quality [seed=0] [num=2000]
    python -m benchmarks.quality_gallery workdir=runs/quality out=docs/methods/quality/gallery.png   # the default out

Rows are the sweep's 2-D mixtures (ring8, grid25), columns the teacher's Euler and ancestral samplers at 4 NFE and
each variant whose finished run ``{variant}-{mixture}-s{seed}`` is in ``workdir`` (others are left out). Each panel
draws ``num`` samples (red) over as many exact ones (grey) and is titled with its energy distance and lost modes
on those samples, so the picture says what the table says.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import torch
from PIL import Image

from benchmarks.quality import VARIANTS, _quiet_torch, draw, spec_nfe, teacher_spec
from core.cli import guard
from core.errors import UsageError

MIXTURES = ("ring8", "grid25")
TEACHER_SAMPLERS = ("euler", "ancestral")
PANEL = 256


def teacher_sampler(teacher, sampler: str, nfe: int = 4):
    from core.generation import generate

    spec = teacher_spec(teacher, sampler, nfe)
    return lambda n, labels: generate(teacher, spec, n, None, shape=teacher.data_shape)


def run_sampler(run_dir: Path):
    """(sample_fn, NFE) of a finished run's student."""
    from core.generation import generate
    from core.rundir import load_run

    nets, spec, _ = load_run(str(run_dir))
    student, teacher = nets.student.eval(), nets.teacher
    return lambda n, labels: generate(student, spec, n, None, shape=teacher.data_shape), spec_nfe(spec)


def panel(mixture, sample_fn, n: int, seed: int, title: str) -> Image.Image:
    """``n`` samples over as many exact ones, drawn and scored as the sweep's table does for that seed."""
    from core.preview import scatter_png
    from plugins.gmm_quality import mixture_quality

    with torch.no_grad():
        x, ref, _ = draw(mixture, sample_fn, n, 7 + seed)
    m = mixture_quality(mixture, x, ref)
    label = f"{title}\nED {m['energy_distance']:.4f}, lost {m['lost_modes']}"
    return Image.open(io.BytesIO(scatter_png(x, ref, size=PANEL, title=label)))


@guard
def main(argv: list[str]) -> int:
    _quiet_torch()
    from plugins.gmm import GaussianMixtureTeacher, GMMConfig

    opts = dict(a.split("=", 1) for a in argv if "=" in a)
    if "workdir" not in opts or set(opts) - {"workdir", "seed", "num", "out"} or len(opts) != len(argv):
        raise UsageError("usage: python -m benchmarks.quality_gallery workdir=SWEEP_WORKDIR [seed=0] [num=2000] "
                         "[out=docs/methods/quality/gallery.png]")
    workdir, out = Path(opts["workdir"]), Path(opts.get("out", "docs/methods/quality/gallery.png"))
    try:
        seed, n = int(opts.get("seed", 0)), int(opts.get("num", 2000))
    except ValueError:
        raise UsageError("seed= and num= take integers, e.g. seed=0 num=2000") from None
    if n < 2:
        raise UsageError(f"num must be at least 2, got {n}")
    if not workdir.is_dir():
        raise UsageError(f"workdir={workdir} is not a directory; pass the --workdir of a quality sweep")

    def finished(variant, mixture):  # a run exports its student when it ends; an unfinished one is left out
        return (workdir / f"{variant}-{mixture}-s{seed}" / "student.safetensors").is_file()

    runs = [v for v in VARIANTS if any(finished(v, m) for m in MIXTURES)]
    if not runs:
        raise UsageError(f"workdir={workdir} holds no run of seed {seed} on {' or '.join(MIXTURES)}; "
                         "run python -m benchmarks.quality --workdir DIR first")
    rows = []
    for name in MIXTURES:
        mixture = GaussianMixtureTeacher(GMMConfig(preset=name))
        row = [panel(mixture, teacher_sampler(mixture, s), n, seed, f"{name} teacher {s}, 4 NFE")
               for s in TEACHER_SAMPLERS]
        for variant in runs:
            if finished(variant, name):
                sample_fn, nfe = run_sampler(workdir / f"{variant}-{name}-s{seed}")
                row.append(panel(mixture, sample_fn, n, seed, f"{name} {variant}, {nfe} NFE"))
            else:
                row.append(Image.new("RGB", (PANEL, PANEL), "white"))
        rows.append(row)
    sheet = Image.new("RGB", (PANEL * max(len(r) for r in rows), PANEL * len(rows)), "white")
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            sheet.paste(img, (j * PANEL, i * PANEL))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"wrote {out} ({len(rows)} mixtures x {len(rows[0])} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
