"""The example third-party plugin (examples/fewstep-example-plugin), installed with pip the way a user
installs one, used through the CLI, and checked by the conformance suite; and deliberately broken
plugins that the suite must reject with messages that say what to fix."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from core import hookimpl, ops, testing
from core.protocols import Phase, SamplingSpec
from core.registry import Registry
from core.timesteps import make_grid

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fewstep-example-plugin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip install --no-deps --no-build-isolation`` of a copy of the example into a private target dir
    (a real wheel build and install, without touching the shared venv or the source tree)."""
    base = tmp_path_factory.mktemp("example-plugin")
    src, target = base / "src", base / "site"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(target), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return target


def fewstep(target: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "FEWSTEP_TENSORBOARD": "0"}
    env.pop("FEWSTEP_PLUGINS", None)
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, cwd=target.parent)


def test_listed_as_third_party(installed):
    out = fewstep(installed, "core.run", "list")
    assert out.returncode == 0, out.stderr
    for name in ("example-cd", "example-churn"):
        line = next(line for line in out.stdout.splitlines() if line.split()[:1] == [name])
        assert "fewstep-example-plugin (third-party)" in line


def test_runs_end_to_end_and_distils(installed, tmp_path):
    """A short consistency-distillation run through the CLI: its 2-step student must beat the exact
    teacher sampled with the same 2-step grid (Euler), by energy distance against exact ring8 samples."""
    run = tmp_path / "cd"
    out = fewstep(installed, "core.run", "objective=example-cd", "teacher=gmm", "teacher.preset=ring8",
                  "train.steps=150", "train.batch=256", "train.eval_every=0", "train.eval_samples=2000",
                  "train.progress=false", f"out={run}")
    assert out.returncode == 0, out.stderr
    student = float(re.search(r"energy_distance=([0-9.e-]+)", out.stdout).group(1))

    from core.metrics import energy_distance
    from core.generation import generate
    from plugins.gmm import GaussianMixtureTeacher, GMMConfig

    teacher = GaussianMixtureTeacher(GMMConfig(preset="ring8"))
    grid = make_grid(teacher.schedule, 3, append_zero=False)[:-1].tolist() + [0.0]  # the student's 2-step grid
    torch.manual_seed(0)
    reference = energy_distance(generate(teacher, SamplingSpec("euler", grid), 2000), teacher.sample_exact(2000))
    assert student < 0.5 * reference, (student, reference)

    # the trained run samples through core.sample (load_run rebuilds the third-party objective; with_steps)
    out = fewstep(installed, "core.sample", f"run={run}", "num=200", "steps=3", f"out={tmp_path / 's.npz'}")
    assert out.returncode == 0 and "multistep, 3 steps" in out.stdout, out.stderr
    # the plugin's sampler, with a config option from the command line
    out = fewstep(installed, "core.sample", "teacher=gmm", "sampler=example-churn", "sampler.churn=5", "steps=8",
                  "num=200", f"out={tmp_path / 't.npz'}")
    assert out.returncode == 0 and "example-churn, 8 steps" in out.stdout, out.stderr


def test_passes_the_conformance_suite(installed, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(installed))
    registry = Registry()
    assert registry.get("objective", "example-cd").dist == "fewstep-example-plugin"
    assert testing.check_plugin("example", registry, tmp_path) == [("objective", "example-cd"),
                                                                    ("sampler", "example-churn")]


def test_its_own_test_suite_passes(installed):
    """The example's tests (examples/fewstep-example-plugin/tests) run as its author runs them: pytest in the
    plugin's folder, with the plugin installed. Nothing in them may skip."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "FEWSTEP_TENSORBOARD": "0"}
    env.pop("FEWSTEP_PLUGINS", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:xdist"],
                          cwd=EXAMPLE, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert re.search(r"\b\d+ passed\b", proc.stdout) and "skipped" not in proc.stdout, proc.stdout[-2000:]


# -- deliberately broken plugins ---------------------------------------------------------------------
class Match:
    """A correct objective (denoiser distillation), the base the broken ones change one thing of."""

    needs_critic = False

    def __init__(self, config=None):
        pass

    def build(self, nets):
        return {}

    def phases(self):
        return [Phase("match", trains=("student",), lr=1e-3)]

    def noised(self, ctx, generator=None):
        x0, sched = ctx.batch["x"], ctx.teacher.schedule
        t = sched.t_from_fraction(torch.rand(x0.shape[0], dtype=torch.float64, generator=generator))
        noise = torch.randn(x0.shape, generator=generator)
        return ops.add_noise(x0, noise, sched.alpha(t), sched.sigma(t)), t.float()

    def loss(self, phase, ctx):
        x_t, t = self.noised(ctx)
        with torch.no_grad():
            target = ctx.teacher.denoise(x_t, t)
        return ops.weighted_loss(ctx.student.denoise(x_t, t), target), {}

    def sampling(self, student):
        return SamplingSpec("euler", make_grid(student.schedule, 4).tolist())


class UnknownTrains(Match):
    """Declares a network the run does not have (a typo for "student")."""

    def phases(self):
        return [Phase("match", trains=("generator",))]


class NoSampling(Match):
    sampling = None


class WrongLossSignature(Match):
    def loss(self, ctx):
        return super().loss("match", ctx)


class SwappedTrains(Match):
    """A two-network method whose phases declare each other's network."""

    needs_critic = True

    def phases(self):
        return [Phase("critic", trains=("student",)), Phase("generator", trains=("critic",))]

    def loss(self, phase, ctx):
        x_t, t = self.noised(ctx)
        net = ctx.critic if phase == "critic" else ctx.student
        return ops.weighted_loss(net.denoise(x_t, t), ctx.batch["x"]), {}


class TogglesRequiresGrad(SwappedTrains):
    """The generator phase switches the critic's gradients on itself, so its loss leaks into the critic."""

    def phases(self):
        return [Phase("critic", trains=("critic",)), Phase("generator", trains=("student",))]

    def loss(self, phase, ctx):
        if phase == "critic":
            return super().loss(phase, ctx)
        ctx.critic.requires_grad_(True)
        x_t, t = self.noised(ctx)
        return ops.weighted_loss(ctx.student.denoise(x_t, t), ctx.critic.denoise(x_t, t)), {}


class PrivateGenerator(Match):
    """Draws its noise from its own generator, which no checkpoint holds: resuming is not exact."""

    def __init__(self, config=None):
        self.generator = torch.Generator().manual_seed(0)

    def loss(self, phase, ctx):
        x_t, t = self.noised(ctx, self.generator)
        with torch.no_grad():
            target = ctx.teacher.denoise(x_t, t)
        return ops.weighted_loss(ctx.student.denoise(x_t, t), target), {}


def sampler_wrong_signature(model, noise, steps):
    return noise


@torch.no_grad()
def sampler_unscaled_start(model, noise, times, cond=None, *, return_trajectory=False, guidance=None, callback=None):
    """Forgets to scale the starting noise by sigma(times[0])."""
    x, traj = noise, [noise]
    extra = {} if guidance is None else {"guidance": guidance}
    for i in range(len(times) - 1):
        x0 = model.denoise(x, times[i].expand(x.shape[0]).float(), cond, **extra)
        s = times[i + 1]
        x = x0 if s == 0 else (x0 + model.schedule.sigma(s) * (x - x0) / model.schedule.sigma(times[i])).float()
        if callback is not None:
            callback({"x": x, "i": i, "t": float(times[i]), "denoised": x0})
        traj.append(x)
    return (x, traj) if return_trajectory else x


def eps_teacher(config, device="cpu"):
    """A ring8 teacher whose denoise returns the noise estimate instead of x0."""
    from plugins.gmm import GaussianMixtureTeacher, GMMConfig

    class EpsTeacher(GaussianMixtureTeacher):
        def denoise(self, x_t, t, cond=None, guidance=None):
            x0 = super().denoise(x_t, t, cond, guidance)
            return (x_t - self.schedule.alpha(t)[:, None] * x0) / self.schedule.sigma(t)[:, None]

    return EpsTeacher(GMMConfig(), device)


class OwnRNGData:
    """Real data from a private generator: a resumed run would see other batches."""

    def __init__(self, config, teacher):
        self.generator = torch.Generator()

    def sample(self, n):
        return {"x": torch.randn(n, 2, generator=self.generator), "cond": None}


def student_hidden_state(config, teacher, device="cpu"):
    """An MLP student with a random output offset kept outside its state_dict."""
    from plugins.students import MLPConfig, mlp_student

    net = mlp_student(MLPConfig(hidden=32, depth=1), teacher, device)
    offset = torch.randn(teacher.data_shape)
    denoise = net.denoise
    net.denoise = lambda x_t, t, cond=None: denoise(x_t, t, cond) + offset
    return net


BROKEN = {
    "unknown-trains": ("objective", UnknownTrains, "trains ['generator'], which the run does not have"),
    "no-sampling": ("objective", NoSampling, "objective has no sampling(); fix: define sampling(student)"),
    "loss-signature": ("objective", WrongLossSignature, "cannot be called as loss(phase, ctx)"),
    "swapped-trains": ("objective", SwappedTrains, "with every network trainable the loss reaches ['critic']"),
    "toggles-requires-grad": ("objective", TogglesRequiresGrad, "sent gradients to ['critic']"),
    "private-generator": ("objective", PrivateGenerator, "interrupted at 2 and resumed"),
    "sampler-signature": ("sampler", sampler_wrong_signature, "fn(model, noise, times, cond=None, *"),
    "sampler-start": ("sampler", sampler_unscaled_start, "start from x = sigma(times[0]) * noise"),
    "teacher-returns-eps": ("teacher", eps_teacher, "return x0 (not eps, v or the score)"),
    "dataset-own-rng": ("dataset", OwnRNGData, "draw randomness from torch's global RNG"),
    "student-hidden-state": ("student", student_hidden_state, "keep every tensor denoise() uses in parameters"),
}


def registry_with(kind: str, name: str, factory) -> Registry:
    """A fresh registry (built-ins loaded) plus a one-hook plugin module registering ``factory``."""
    plugin = types.ModuleType("broken_plugin")

    def hook(register):
        register(name, factory)

    setattr(plugin, f"register_{kind}s", hookimpl(hook))
    registry = Registry()
    registry.add(plugin, name="broken")
    return registry


def test_a_correct_plugin_passes(tmp_path):
    """The control for the broken ones below: the same objective without the defect passes."""
    testing.check("objective", "match", registry_with("objective", "match", Match), tmp_path)


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_plugin_fails_with_a_fix(case, tmp_path):
    kind, factory, expected = BROKEN[case]
    registry = registry_with(kind, f"broken-{case}", factory)
    with pytest.raises(testing.ConformanceError) as info:
        testing.check(kind, f"broken-{case}", registry, tmp_path)
    message = str(info.value)
    assert expected in message and "fix:" in message, message
