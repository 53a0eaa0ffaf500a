"""The exact Gaussian-mixture teacher against Monte-Carlo float64 posteriors and its own exact samples."""

import json
import math
import re

import pytest
import torch

from core.errors import ConfigError, UsageError
from core.metrics import energy_distance
from core.timesteps import make_grid
from plugins.gmm import PRESETS, GaussianMixtureTeacher, GMMConfig, load_spec
from plugins.samplers.basic import euler


def mc_posterior_mean(teacher, x_t, t, labels=None, n=400_000):
    """E[x0 | x_t] by self-normalised importance sampling from the prior (independent of the closed form)."""
    gen = torch.Generator().manual_seed(1)
    x0 = teacher.sample_exact(n, None if labels is None else labels.expand(n), generator=gen).double()
    a, s = float(teacher.schedule.alpha(torch.tensor(t))), float(teacher.schedule.sigma(torch.tensor(t)))
    logw = -((x_t.double()[None] - a * x0) ** 2).sum(1) / (2 * s * s)
    w = torch.softmax(logw, 0)
    return (w[:, None] * x0).sum(0)


@pytest.mark.parametrize("schedule", ["edm", "vp-cosine", "flow"])
def test_denoiser_matches_monte_carlo_posterior(schedule):
    teacher = GaussianMixtureTeacher(GMMConfig(preset="ring8", schedule=schedule))
    t = {"edm": 0.6, "vp-cosine": 0.5, "flow": 0.45}[schedule]
    x_t = torch.tensor([0.3, -0.2], dtype=torch.float64) * float(teacher.schedule.alpha(torch.tensor(t))) + 0.1
    exact = teacher.denoise(x_t[None], torch.tensor([t], dtype=torch.float64))[0]
    torch.testing.assert_close(exact, mc_posterior_mean(teacher, x_t, t), atol=1.5e-2, rtol=0)


def test_class_conditional_and_exact_cfg():
    teacher = GaussianMixtureTeacher(GMMConfig(preset="cls4"))
    x_t, t = torch.tensor([[0.5, 0.4]], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    label = torch.tensor([1])
    cond = teacher.denoise(x_t, t, label)
    torch.testing.assert_close(cond[0], mc_posterior_mean(teacher, x_t[0], 0.5, label), atol=1.5e-2, rtol=0)
    uncond = teacher.denoise(x_t, t)
    guided = teacher.denoise(x_t, t, label, guidance=3.0)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond))


@pytest.mark.parametrize("preset", PRESETS)
def test_many_step_sampling_reaches_noise_floor(preset):
    teacher = GaussianMixtureTeacher(GMMConfig(preset=preset))
    n = 2000
    # the noise floor: how far apart two independent exact sample sets of this size land
    floors = [abs(energy_distance(teacher.sample_exact(n), teacher.sample_exact(n))) for _ in range(5)]
    ref = teacher.sample_exact(n)
    many = energy_distance(euler(teacher, torch.randn(n, *teacher.data_shape), make_grid(teacher.schedule, 64)), ref)
    few = energy_distance(euler(teacher, torch.randn(n, *teacher.data_shape), make_grid(teacher.schedule, 1)), ref)
    bound = 3 * max(floors) + 2e-3
    assert many < bound, (many, floors)
    assert few > 10 * bound  # one Euler step is far off: the check can fail  # one Euler step is far off: the check can fail


def test_exact_samples_have_preset_moments():
    teacher = GaussianMixtureTeacher(GMMConfig(preset="hd16"))
    x = teacher.sample_exact(200_000).double()
    mean = (teacher.weights[:, None] * teacher.means).sum(0)
    torch.testing.assert_close(x.mean(0), mean, atol=0.02, rtol=0)
    assert abs(float(x.std(0).pow(2).mean().sqrt()) - teacher.sigma_data) < 0.02


def test_spec_file(tmp_path):
    spec = {"weights": [1, 3], "means": [[0.0], [2.0]], "stds": [[0.1], [0.2]]}
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(spec))
    teacher = GaussianMixtureTeacher(GMMConfig(spec=str(path)))
    torch.testing.assert_close(teacher.weights, torch.tensor([0.25, 0.75], dtype=torch.float64))
    far = teacher.denoise(torch.tensor([[2.0]]), torch.tensor([1e-3]))
    assert abs(float(far) - 2.0) < 1e-3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"weights": [1]}))
    with pytest.raises(UsageError, match="lacks"):
        GaussianMixtureTeacher(GMMConfig(spec=str(bad)))


GOOD = {"weights": [0.5, 1.5], "means": [[0.0], [2.0]], "stds": [[0.1], [0.2]]}


def test_spec_file_fractional_weights_and_class_labels(tmp_path):
    path = tmp_path / "mix.json"
    path.write_text(json.dumps({**GOOD, "classes": [0, 2]}))
    spec = load_spec(str(path))
    teacher = GaussianMixtureTeacher(GMMConfig(spec=str(path), preset="not-a-preset"))  # the spec wins
    # sigma_data^2 = sum_k w_k (s_k^2 + mu_k^2) - (sum_k w_k mu_k)^2 = 0.25 * 0.01 + 0.75 * 4.04 - 1.5^2
    assert teacher.sigma_data == pytest.approx(math.sqrt(0.25 * 0.01 + 0.75 * 4.04 - 1.5**2), rel=1e-12)
    assert teacher.encode_condition(None) is None  # unconditional
    assert torch.equal(teacher.encode_condition([2, 0]), torch.tensor([2, 0]))
    torch.testing.assert_close(spec["weights"], torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert torch.equal(spec["classes"], torch.tensor([0, 2]))


@pytest.mark.parametrize("change,message", [
    ({"means": [[0.0], [float("nan")]]}, "'means' holds NaN or inf; every value must be finite"),
    ({"stds": [[0.1, 0.1], [0.2, 0.2]]},
     r"need K weights and K x D means and stds, got shapes \(2,\), \(2, 1\), \(2, 2\)"),
    ({"weights": [-1.0, 2.0]}, r"weights must be >= 0 with a positive sum, got \[-1.0, 2.0\]"),
    ({"classes": [-1, 0]}, r"'classes' must list one integer label >= 0 per component \(2\)"),
    ({"classes": [True, 0]}, "'classes' must list one integer label"),
])
def test_bad_spec_files_name_the_file_and_the_problem(tmp_path, change, message):
    path = tmp_path / "mix.json"
    path.write_text(json.dumps({**GOOD, **change}))
    with pytest.raises(ConfigError, match=f"^teacher.spec={re.escape(str(path))}: {message}"):
        load_spec(str(path))


def test_one_component_posterior_on_a_vp_schedule(tmp_path):
    """N(mu, s0^2) data, x_t = a x0 + s eps: E[x0 | x_t] = mu + a s0^2 (x_t - a mu) / (a^2 s0^2 + s^2) (VP, a < 1),
    and float32 times give the float64 answer (the schedule is evaluated in float64)."""
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"weights": [1.0], "means": [[0.7, -0.4]], "stds": [[0.3, 0.5]]}))
    teacher = GaussianMixtureTeacher(GMMConfig(spec=str(path), schedule="vp-cosine"))
    t = torch.tensor([0.2, 0.5, 0.8])
    a, s = torch.cos(torch.pi * t.double() / 2)[:, None], torch.sin(torch.pi * t.double() / 2)[:, None]
    mu, s0 = torch.tensor([0.7, -0.4], dtype=torch.float64), torch.tensor([0.3, 0.5], dtype=torch.float64)
    x_t = torch.randn(3, 2, dtype=torch.float64)
    expect = mu + a * s0**2 * (x_t - a * mu) / (a**2 * s0**2 + s**2)
    torch.testing.assert_close(teacher.denoise(x_t, t), expect, rtol=1e-12, atol=1e-12)


def test_class_frequencies_of_the_data(tmp_path):
    from plugins.gmm import GaussianMixtureData, GMMDataConfig

    teacher = GaussianMixtureTeacher(GMMConfig(preset="cls4"))
    for probs in ([1.0, 1.0, 1.0], [1.0, -1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]):
        need = f"data.class_probs={probs}: need 4 values >= 0 with a positive sum"
        with pytest.raises(UsageError, match=re.escape(need)):
            GaussianMixtureData(GMMDataConfig(class_probs=probs), teacher)
    with pytest.raises(UsageError, match=re.escape("data.class_probs=[1.0]: need none: this mixture has no classes")):
        GaussianMixtureData(GMMDataConfig(class_probs=[1.0]), GaussianMixtureTeacher(GMMConfig()))
    torch.manual_seed(0)
    labels = GaussianMixtureData(GMMDataConfig(class_probs=[0.0, 3.0, 0.0, 1.0]), teacher).sample(4000)["cond"]
    assert set(labels.tolist()) == {1, 3} and abs(float((labels == 1).double().mean()) - 0.75) < 0.03


def test_presets_written_out():
    from plugins.gmm import preset

    ring = preset("ring8")
    k = torch.arange(8, dtype=torch.float64)
    expect = torch.stack([torch.cos(2 * torch.pi * k / 8), torch.sin(2 * torch.pi * k / 8)], 1)
    torch.testing.assert_close(ring["means"], expect, rtol=0, atol=1e-15)
    assert torch.equal(ring["weights"], torch.full((8,), 0.125, dtype=torch.float64))
    assert torch.equal(ring["stds"], torch.full((8, 2), 0.08, dtype=torch.float64))
    cls4 = preset("cls4")  # ring8 with classes 0, 0, 1, 1, 2, 2, 3, 3
    assert torch.equal(cls4["weights"], ring["weights"]) and torch.equal(cls4["means"], ring["means"])
    assert torch.equal(cls4["classes"], torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    grid = preset("grid25")
    g = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=torch.float64)
    assert torch.equal(grid["means"], torch.stack([g.repeat_interleave(5), g.repeat(5)], 1))
    assert grid["weights"].dtype == torch.float64  # weights i / 325, i = 1..25, in a fixed order
    assert sorted((grid["weights"] * 325).round().long().tolist()) == list(range(1, 26))
    torch.testing.assert_close(grid["weights"].sort().values, torch.arange(1, 26, dtype=torch.float64) / 325,
                               rtol=1e-15, atol=0)


def test_exact_samples_reproduce_from_a_generator():
    teacher = GaussianMixtureTeacher(GMMConfig(preset="cls4"))
    labels = torch.tensor([0, 1, 2, 3] * 8)
    state = torch.get_rng_state()
    a = teacher.sample_exact(32, labels, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)  # the default generator is left alone
    assert torch.equal(teacher.sample_exact(32, labels, generator=torch.Generator().manual_seed(7)), a)


def test_edm_teacher_takes_the_configured_sigma_range():
    schedule = GaussianMixtureTeacher(GMMConfig(sigma_min=0.01, sigma_max=20.0)).schedule
    assert (schedule.name, schedule.t_min, schedule.t_max) == ("edm", 0.01, 20.0)
