"""DMD2 quality on exact mixtures, measured with the project's metrics against exact samples: the distilled
student vs the exact teacher's own Euler sampler at 1/2/64 steps (docs/methods/dmd2.md records the numbers)."""

from __future__ import annotations

import pytest
import torch
from conftest import train

from core.metrics import energy_distance, gmm_report, mode_masses
from core.protocols import SamplingSpec
from core.generation import generate
from core.timesteps import make_grid

pytestmark = pytest.mark.slow
N = 4000


def teacher_energy(teacher, steps: int, cond=None, guidance=None, seed: int = 7) -> float:
    """Energy distance of the exact teacher's Euler sampler (``steps`` denoiser calls) to exact samples."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        spec = SamplingSpec("euler", make_grid(teacher.schedule, steps).tolist(), {})
        extra = {} if guidance is None else {"guidance": guidance}
        x = generate(teacher, spec, N, cond, shape=teacher.data_shape, **extra)
        return energy_distance(x, teacher.sample_exact(N, cond))


def student_samples(trainer, cond=None, seed: int = 7, n: int = N):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return generate(trainer.student, trainer.spec, n, cond, shape=trainer.teacher.data_shape)


def test_ring8_one_step_student_covers_every_mode_and_beats_the_teachers_few_step_samplers(tmp_path):
    # the default run (python -m core.run): objective=dmd2 teacher=gmm ring8, 1 step, its train_defaults
    res = train(f"out={tmp_path}")
    tr = res["trainer"]
    assert tr.spec.sampler == "multistep" and len(tr.spec.times) == 2
    teacher = tr.teacher
    x = student_samples(tr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        ref = teacher.sample_exact(N)
    report = gmm_report(teacher, x, ref)
    ratio = mode_masses(teacher.assign_modes(x), 8) / teacher.weights
    assert ((ratio > 0.5) & (ratio < 1.5)).all(), ratio
    e1, e2, e64 = (teacher_energy(teacher, k) for k in (1, 2, 64))
    student = report["energy_distance"]
    assert student < 0.05 * min(e1, e2), (student, e1, e2)
    # close to the 64-step sampler: at least 97% of the way from the 1-step sampler's distance to it
    assert student - e64 < 0.03 * (e1 - e64), (student, e64, e1)


def test_cls4_conditional_student_with_cfg_samples_the_right_class(tmp_path):
    res = train("teacher.preset=cls4", "objective.guidance=3", "objective.gan=off", "train.steps=1200",
                "train.batch=128", "train.eval_every=0", "train.lr_decay=cosine", f"out={tmp_path}")
    tr = res["trainer"]
    teacher = tr.teacher
    labels = torch.arange(N) % 4
    x = student_samples(tr, labels)
    modes = teacher.assign_modes(x)
    right = (teacher.classes[modes] == labels).double().mean()
    assert right > 0.97, float(right)
    for c in range(4):  # both modes of each class are sampled (the class's two modes mirror each other)
        share = (modes[labels == c] == 2 * c).double().mean()
        assert 0.25 < share < 0.75, (c, float(share))
    # CFG with w = 3 changes the target law (it pushes classes apart), so a guided student cannot match exact class
    # data closely; it must still beat the teacher's own guided 1-step sampler on it
    e_student = energy_distance(x, teacher.sample_exact(N, labels))
    e1 = teacher_energy(teacher, 1, labels, guidance=3)
    assert e_student < e1, (e_student, e1)


@pytest.fixture(scope="module")
def hd16_runs(tmp_path_factory):
    common = ("teacher.preset=hd16", "objective.gan=off", "train.steps=1500", "train.batch=128",
              "train.eval_every=0", "train.lr_decay=cosine")
    out = {}
    for k in (1, 4):
        out[k] = train(*common, f"objective.steps={k}", f"out={tmp_path_factory.mktemp(f'hd16-{k}')}")["trainer"]
    return out


def test_hd16_one_and_four_step_students_beat_the_teachers_one_and_two_step_samplers(hd16_runs):
    teacher = hd16_runs[1].teacher
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        ref = teacher.sample_exact(N)
    e = {k: energy_distance(student_samples(tr), ref) for k, tr in hd16_runs.items()}
    e1_teacher, e2_teacher = teacher_energy(teacher, 1), teacher_energy(teacher, 2)
    assert max(e.values()) < 0.5 * min(e1_teacher, e2_teacher), (e, e1_teacher, e2_teacher)


def test_hd16_four_step_student_beats_the_one_step(hd16_runs):
    """With the EDM step times (80, 2.5, 0.74, 0.17) each step after the first refines; at DMD2's evenly spaced
    fractions (80, 17.5, 2.5, 0.17) the 4-step student was 4x worse than its 1-step one. At this budget (1500
    iterations, no GAN) it is 0.68x; the sweep's default budget reaches the issue's 1/2 (docs/methods/quality.md).
    20000 samples: at 4000 the distance's noise (~1e-3) is the 4-step's size."""
    teacher, n = hd16_runs[1].teacher, 20000
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        ref = teacher.sample_exact(n)
    e = {k: energy_distance(student_samples(tr, n=n), ref, max_n=n) for k, tr in hd16_runs.items()}
    assert e[4] <= e[1], e


@pytest.fixture(scope="module")
def cls4_network_teacher(tmp_path_factory):
    """A class-conditional MLP teacher trained with objective=denoise on cls4 (log sigma std 2 so that it has
    seen the high noise levels a 1-step generator starts from)."""
    out = tmp_path_factory.mktemp("cls4-teacher") / "run"
    train("objective=denoise", "teacher=gmm", "teacher.preset=cls4", "student.hidden=64", "student.depth=2",
          "student.emb_dim=32", "objective.p_std=2.0", "train.steps=600", "train.batch=256", "train.eval_every=0",
          "train.preview_every=0", f"out={out}", "seed=0")
    return str(out)


def test_network_teacher_guided_student_samples_the_requested_class(cls4_network_teacher, tmp_path):
    """DMD2 from a network teacher with CFG (w = 3): the 1-step student, asked for class c, lands on one of
    class c's two modes (measured: 97% of samples; a student that ignored the label would reach about 25%)."""
    res = train("teacher=checkpoint", f"teacher.path={cls4_network_teacher}", "objective.guidance=3",
                "objective.gan=off", "objective.lr=3e-4", "train.steps=600", "train.batch=128",
                "train.lr_decay=cosine", "train.eval_every=0", "train.preview_every=0", f"out={tmp_path}")
    tr = res["trainer"]
    source = tr.teacher.source  # the exact cls4 mixture the teacher was trained on
    labels = torch.arange(N) % 4
    modes = source.assign_modes(student_samples(tr, labels))
    right = (source.classes[modes] == labels).double().mean()
    assert right > 0.9, float(right)
