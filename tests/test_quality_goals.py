"""The quality goals of docs/methods/quality.md at CI size: DMD2 1-step and MM 4-step with their defaults on ring8
and grid25 keep every mode and beat the exact teacher's own few-step samplers, scored against exact samples."""

from __future__ import annotations

import pytest
import torch
from conftest import train

from core.protocols import SamplingSpec
from core.generation import generate
from core.timesteps import make_grid
from plugins.gmm_quality import mixture_quality
from core.timesteps import fraction_grid

pytestmark = pytest.mark.slow
N = 4000


def scored(teacher, sample, seed=7, n=N) -> dict:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x = sample(n)
        torch.manual_seed(seed + 1000)
        return mixture_quality(teacher, x, teacher.sample_exact(n))


def teacher_score(teacher, sampler: str, nfe: int, refine: bool = False) -> dict:
    """The teacher's own sampler; ancestral on the paper's grid i/k, or with ``refine`` on MM's default grid."""
    grid = (fraction_grid(teacher.schedule, nfe, refine) if sampler == "ancestral"
            else make_grid(teacher.schedule, nfe))
    spec = SamplingSpec(sampler, grid.tolist(), {})
    return scored(teacher, lambda n: generate(teacher, spec, n, shape=teacher.data_shape))


def student_score(trainer) -> dict:
    return scored(trainer.teacher, lambda n: generate(trainer.student, trainer.spec, n,
                                                      shape=trainer.teacher.data_shape))


@pytest.fixture(scope="module")
def dmd2_runs(tmp_path_factory):
    """DMD2 at its defaults, trained once per (preset, steps) for the tests below."""
    runs = {}

    def get(preset: str, steps: int):
        if (preset, steps) not in runs:
            out = tmp_path_factory.mktemp(f"dmd2-{preset}-{steps}")
            runs[preset, steps] = train("objective=dmd2", f"objective.steps={steps}", f"teacher.preset={preset}",
                                        "train.eval_every=0", f"out={out}")["trainer"]
        return runs[preset, steps]

    return get


@pytest.mark.parametrize("preset", ["ring8", "grid25"])
def test_dmd2_one_step_keeps_every_mode_and_beats_the_teachers_8_step_euler(preset, dmd2_runs):
    tr = dmd2_runs(preset, 1)
    assert len(tr.spec.times) == 2  # one network call
    student, euler8 = student_score(tr), teacher_score(tr.teacher, "euler", 8)
    assert student["lost_modes"] == 0, student
    assert student["energy_distance"] <= euler8["energy_distance"], (student, euler8)


def test_dmd2_four_step_halves_its_one_step_distance_on_ring8(dmd2_runs):
    """The 4-step goal at the defaults (docs/methods/quality.md, ninth pass): every batch trains every step
    (step_sampling=stratified) and the critic runs 2 updates per generator update. Measured (3 seeds, 20000
    samples): 0.0000-0.0002 against the 1-step's 0.0005-0.0007, 5% off the modes, no lost mode; the teacher's 4-step
    Euler 0.065. Scored with 20000 samples, which resolve distances near 1e-4."""
    one, four = dmd2_runs("ring8", 1), dmd2_runs("ring8", 4)
    assert len(four.spec.times) == 5 and four.objective.stratified and four.objective.critic_ratio == 2
    e1 = scored(one.teacher, lambda n: generate(one.student, one.spec, n, shape=one.teacher.data_shape), n=20000)
    e4 = scored(four.teacher, lambda n: generate(four.student, four.spec, n, shape=four.teacher.data_shape), n=20000)
    euler4 = teacher_score(four.teacher, "euler", 4)
    assert e4["lost_modes"] == 0, e4
    assert e4["energy_distance"] <= 0.5 * e1["energy_distance"], (e4, e1)
    assert e4["energy_distance"] <= euler4["energy_distance"] / 20, (e4, euler4)
    assert e4["off_manifold"] < 0.1, e4  # exact samples: 0.001; iteration sampling at r = 5: 0.10-0.12


@pytest.mark.parametrize("preset", ["ring8", "grid25"])
def test_mm_four_step_at_one_to_one_keeps_every_mode_and_beats_the_teachers_4_step_ancestral(preset, tmp_path):
    """Measured at the defaults (t on the refined grid, flat weighting; 3 seeds, 20000 samples): ring8 0.0012-0.0018
    and grid25 0.0020-0.0036 against the teacher's 4-step ancestral 0.037 and 0.29 on the paper's grid and 0.0099 and
    0.066 on the refined one, no lost mode (docs/methods/quality.md, twelfth pass)."""
    tr = train("objective=mm", f"teacher.preset={preset}", "train.eval_every=0", f"out={tmp_path}")["trainer"]
    assert tr.objective.config.aux_steps == 1  # the paper's 1:1 alternation
    student, ancestral4 = student_score(tr), teacher_score(tr.teacher, "ancestral", 4)
    assert student["lost_modes"] == 0, student
    assert student["energy_distance"] <= ancestral4["energy_distance"], (student, ancestral4)
    # the same bar on the student's own grid (grid=refine: sigma = 80, 2.5, 0.74, 0.17), where the teacher is better
    refined4 = teacher_score(tr.teacher, "ancestral", 4, refine=True)
    assert student["energy_distance"] <= refined4["energy_distance"], (student, refined4)
