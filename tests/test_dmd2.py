"""DMD2 objective: the DM gradient against a float64 reference per parameterisation, TTUR counts, backward
simulation noise levels, times and sampling, network teachers, CLI sampling, the regression target and the
critic phase's draws (the GAN term: tests/test_dmd2_gan.py)."""

from __future__ import annotations

import math

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import run_config, train

from core.errors import UsageError
from core.protocols import Context
from core.schedules import make_schedule
import plugins.dmd2 as dmd2
from plugins.dmd2 import DMD2, DMD2Config, default_times, generator_times

TINY = ("student.hidden=32", "student.depth=2", "student.emb_dim=16", "train.batch=32", "train.eval_every=0",
        "train.preview_every=0", "train.eval_samples=64", "train.log_every=5")


# -- the distribution-matching gradient vs a float64 reference ----------------------------------------------

class RawNet:
    """A fixed random 'network' F(x_t, t, c) in float64 whose output is read as eps, v, x0 or flow velocity.
    Records every call, so the reference can recompute the same outputs."""

    def __init__(self, schedule, prediction, dim, seed):
        g = torch.Generator().manual_seed(seed)
        self.schedule, self.prediction = schedule, prediction
        self.W = torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
        self.b = torch.randn(dim, generator=g, dtype=torch.float64)
        self.E = torch.randn(4, dim, generator=g, dtype=torch.float64)  # class embeddings, row 3 = null
        self.calls = []

    def raw(self, x_t, t, cond):
        c = torch.full((x_t.shape[0],), 3) if cond is None else cond
        return torch.tanh(x_t @ self.W + t[:, None] * self.b + self.E[c])

    def denoise(self, x_t, t, cond=None, guidance=None):
        from core.parameterization import to_x0

        self.calls.append({"x_t": x_t.clone(), "t": t.clone(), "cond": cond, "guidance": guidance})
        out = self.raw(x_t, t, cond)
        if guidance is not None and guidance != 1 and cond is not None:
            out = self.raw(x_t, t, None) + guidance * (out - self.raw(x_t, t, None))
        return to_x0(out, x_t, self.schedule.alpha(t), self.schedule.sigma(t), self.prediction)


class RawCritic(RawNet):
    def denoise(self, x_t, t, cond=None):  # a critic takes no guidance argument at all
        return super().denoise(x_t, t, cond)


# x_t = alpha x0 + sigma eps on each schedule, and the method note's x0 conversions (sec. 2), written out here
ALPHA_SIGMA = {"vp-cosine": lambda t: (torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)),
               "flow": lambda t: (1 - t, t),
               "edm": lambda t: (torch.ones_like(t), t)}
TO_X0 = {"eps": lambda raw, x, a, s, t: (x - s * raw) / a,
         "v": lambda raw, x, a, s, t: a * x - s * raw,  # alpha^2 + sigma^2 = 1
         "x0": lambda raw, x, a, s, t: raw,
         "flow": lambda raw, x, a, s, t: x - t * raw}
CASES = [("eps", "vp-cosine"), ("v", "vp-cosine"), ("x0", "edm"), ("flow", "flow")]


@pytest.mark.parametrize("guidance", [None, 3.0])
@pytest.mark.parametrize("prediction,schedule", CASES)
def test_dm_gradient_matches_float64_reference(prediction, schedule, guidance):
    B, D = 512, 3
    sched = make_schedule(schedule)
    teacher, critic = RawNet(sched, prediction, D, 1), RawCritic(sched, prediction, D, 2)
    obj = DMD2(DMD2Config(guidance=guidance))
    x = (0.7 * torch.randn(B, D, dtype=torch.float64)).requires_grad_(True)
    cond = torch.randint(0, 3, (B,))
    loss = obj.distribution_matching_loss(x, cond, teacher, critic)
    loss.backward()

    call_r, call_f = teacher.calls[0], critic.calls[0]
    assert call_r["guidance"] == guidance and call_f["guidance"] is None
    assert torch.equal(call_r["x_t"], call_f["x_t"]) and torch.equal(call_r["t"], call_f["t"])
    x_t, t = call_r["x_t"], call_r["t"]
    assert t.min() >= sched.t_from_fraction(0.02) - 1e-12 and t.max() <= sched.t_from_fraction(0.98) + 1e-12
    a, s = (v[:, None] for v in ALPHA_SIGMA[schedule](t))
    eps = (x_t - a * x.detach()) / s  # x_t = alpha x + sigma eps with eps ~ N(0, I)
    assert abs(eps.mean()) < 0.1 and abs(eps.std() - 1) < 0.1

    # reference: CFG in the raw output space (eps_u + w (eps_c - eps_u)), then x0, then the DMD2 gradient
    raw_r = teacher.raw(x_t, t, cond)
    if guidance is not None:
        raw_r = teacher.raw(x_t, t, None) + guidance * (raw_r - teacher.raw(x_t, t, None))
    x0_real = TO_X0[prediction](raw_r, x_t, a, s, t[:, None])
    x0_fake = TO_X0[prediction](critic.raw(x_t, t, cond), x_t, a, s, t[:, None])
    norm = (x.detach() - x0_real).abs().mean(1, keepdim=True)
    g = (x0_fake - x0_real) / norm
    torch.testing.assert_close(x.grad, g / (B * D), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(loss, 0.5 * (g**2).mean(), rtol=1e-10, atol=1e-14)


def test_dm_gradient_is_nan_safe_when_x_equals_the_teacher_estimate():
    class Echo:  # x0_real == x exactly: the normaliser is 0
        schedule = make_schedule("edm")

        def __init__(self, x):
            self.x = x

        def denoise(self, x_t, t, cond=None, guidance=None):
            return self.x.detach().clone()

    x = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    critic = RawCritic(Echo.schedule, "x0", 2, 0)
    DMD2(DMD2Config()).distribution_matching_loss(x, None, Echo(x), critic).backward()
    assert torch.isfinite(x.grad).all() and (x.grad == 0).all()


# -- two time-scale updates ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio,steps", [(5, 23), (3, 10)])
def test_ttur_phase_counts_are_exact(tmp_path, ratio, steps):
    res = train(*TINY, f"train.steps={steps}", f"objective.critic_updates={ratio}", "objective.lr=2e-4",
                "objective.critic_lr=7e-4", f"out={tmp_path}")
    tr = res["trainer"]
    gen, crit = tr.optimizers["generator"], tr.optimizers["critic"]
    # separate optimizers over separate networks, each with its own learning rate
    assert {id(p) for g in gen.param_groups for p in g["params"]} == {id(p) for p in tr.student.parameters()}
    critic_params = [*tr.nets["critic"].parameters(), *tr.nets["gan_head"].parameters()]
    assert {id(p) for g in crit.param_groups for p in g["params"]} == {id(p) for p in critic_params}
    assert {name: s.base_lrs for name, s in tr.state.schedules.items()} == {"generator": [2e-4], "critic": [7e-4]}
    # generator on iterations n % r == 0, critic (and GAN head) on every iteration
    assert {int(s["step"]) for s in gen.state.values()} == {len(range(0, steps, ratio))}
    assert {int(s["step"]) for s in crit.state.values()} == {steps}


def test_generator_phase_leaves_critic_and_head_untouched(tmp_path):
    from core.runner import Trainer

    tr = Trainer(run_config(*TINY, "train.steps=1", f"out={tmp_path}"))
    tr.build()
    before = {n: [p.detach().clone() for p in tr.nets[n].parameters()] for n in ("student", "critic", "gan_head")}
    batch = tr.parallel.micro_batches(tr.networks.dataset, tr.teacher)
    ctx = Context(tr.nets, batch[0], 0, tr.micro, tr.device)
    metrics = tr.run_phase(tr.phases[0], [ctx], 0)
    assert tr.phases[0].name == "generator" and {"dm", "gan"} <= set(metrics)
    for n, old in before.items():
        same = all(torch.equal(a, b) for a, b in zip(old, tr.nets[n].parameters()))
        assert same == (n != "student"), n


# -- backward simulation ------------------------------------------------------------------------------------

class ConstantGenerator(torch.nn.Module):
    """A generator whose x0 estimate is always c; records the inputs it is called on."""

    def __init__(self, schedule, c):
        super().__init__()
        self.schedule, self.c, self.calls, self.cond_rows = schedule, c, [], []

    def denoise(self, x_t, t, cond=None):
        self.calls.append((x_t.clone(), t.clone()))
        self.cond_rows.append(cond)
        return torch.full_like(x_t, self.c)


@pytest.mark.parametrize("schedule", ["vp-cosine", "edm"])
def test_backward_simulation_inputs_sit_at_the_right_noise_levels(schedule):
    sched = make_schedule(schedule)
    obj = DMD2(DMD2Config(steps=4))
    obj.times = generator_times(obj.config, sched)
    teacher = type("T", (), {"data_shape": (4,), "schedule": sched})()
    c, B = 0.3, 4096
    seen = set()
    for it in range(40):
        gen = ConstantGenerator(sched, c)
        ctx = Context({"teacher": teacher, "student": gen}, {"x": None, "cond": None}, it, B, "cpu")
        x_in, t_in = obj.generator_input(ctx)
        assert obj.generator_input(ctx)[0] is x_in  # one input per iteration, shared by both phases
        assert (t_in == t_in[0]).all()  # one k for the whole batch
        k = obj.times.index(pytest.approx(float(t_in[0]), rel=1e-6))
        seen.add(k)
        assert [float(t[0]) for _, t in gen.calls] == pytest.approx(obj.times[:k])  # the generator's own steps
        states = [x for x, _ in gen.calls] + [x_in]
        for j, x in enumerate(states):
            tj = torch.tensor(obj.times[j], dtype=torch.float64)
            a, s = float(sched.alpha(tj)), float(sched.sigma(tj))
            mean = 0.0 if j == 0 else a * c  # x_{tau_j} = alpha G(...) + sigma eps_j; pure noise at j = 0
            eps = (x.double() - mean) / s
            assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05, (k, j)
            if j > 0:  # fresh, independent noise at every re-noising
                prev = (states[j - 1].double() - (0.0 if j == 1 else a_prev * c)) / s_prev
                assert abs(torch.corrcoef(torch.stack([prev.flatten(), eps.flatten()]))[0, 1]) < 0.05
            a_prev, s_prev = a, s
    assert seen == {0, 1, 2, 3}


@pytest.mark.parametrize("batch", [4096, 4099])
def test_stratified_batches_train_every_step_on_its_own_rollout(batch):
    """step_sampling=stratified: rows split into K contiguous groups of B/K (+1), group k at tau_k, each group's
    input the generator's own first k steps from fresh, independent noise (sec. 7), every iteration; conditions
    follow the rows."""
    sched = make_schedule("edm")
    obj = DMD2(DMD2Config(steps=4, step_sampling="stratified"))
    obj.times = generator_times(obj.config, sched)
    teacher = type("T", (), {"data_shape": (4,), "schedule": sched})()
    c, labels = 0.3, torch.arange(batch) % 7
    gen = ConstantGenerator(sched, c)
    ctx = Context({"teacher": teacher, "student": gen}, {"x": None, "cond": labels}, 0, batch, "cpu")
    x_in, t_in = obj.generator_input(ctx)
    sizes = [len(r) for r in np.array_split(np.arange(batch), 4)]  # numpy's split as the reference
    starts = np.cumsum([0, *sizes])
    assert ctx.cache["dmd2.groups"] == [(k, slice(int(starts[k]), int(starts[k + 1]))) for k in range(4)]
    for k in range(4):
        rows = slice(int(starts[k]), int(starts[k + 1]))
        assert torch.equal(t_in[rows], torch.full((sizes[k],), obj.times[k], dtype=t_in.dtype))
        tk = torch.tensor(obj.times[k], dtype=torch.float64)
        mean = 0.0 if k == 0 else float(sched.alpha(tk)) * c
        eps = (x_in[rows].double() - mean) / float(sched.sigma(tk))
        assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05, k
    # one rollout: step j calls the generator at tau_j on the rows still behind (k > j) and their labels only
    calls = [(len(x), float(t.unique())) for x, t in gen.calls]  # one time per call (float32 there)
    expect = [(sum(sizes[j + 1:]), obj.times[j]) for j in range(3)]
    assert [n for n, _ in calls] == [n for n, _ in expect]
    assert [t for _, t in calls] == pytest.approx([t for _, t in expect], rel=1e-6)
    eps = []
    for j in (1, 2):  # group 3's rows in the calls at tau_1 and tau_2 (call j holds rows starts[j + 1]:)
        tj = torch.tensor(obj.times[j], dtype=torch.float64)
        x = gen.calls[j][0][int(starts[3] - starts[j + 1]):].double()
        eps.append(((x - float(sched.alpha(tj)) * c) / float(sched.sigma(tj))).flatten())
    assert abs(torch.corrcoef(torch.stack(eps))[0, 1]) < 0.05  # fresh noise at every re-noising
    for j, cnd in enumerate(gen.cond_rows):
        torch.testing.assert_close(cnd, labels[int(starts[j + 1]):], rtol=0, atol=0)


@pytest.mark.parametrize("total,K,parts", [(128, 4, 1), (128, 4, 2), (128, 4, 8), (130, 4, 2), (6, 4, 3), (7, 3, 7)])
def test_step_groups_of_micro_batches_tile_the_global_split(total, K, parts):
    """Micro-batches (ranks x grad_accum) see exactly the groups one process sees for the whole batch: numpy's
    array_split of the global rows into K as the reference."""
    from plugins.dmd2 import step_groups

    reference = np.empty(total, dtype=int)
    for k, rows in enumerate(np.array_split(np.arange(total), K)):
        reference[rows] = k
    micro, seen = total // parts, np.full(total, -1)
    for j in range(parts):
        for k, rows in step_groups(K, total, j * micro, micro):
            assert rows.start < rows.stop
            seen[j * micro + rows.start:j * micro + rows.stop] = k
    assert (seen == reference).all()


def test_stratified_regression_loss_weights_each_groups_rows(monkeypatch):
    """The regression loss over row groups: sum_k w_k ||x_k - ODE_k||^2 / numel, each group's target from its own
    tau_k (step 0 from t_max)."""
    sched = make_schedule("edm")
    obj = DMD2(DMD2Config(steps=3, step_sampling="stratified", regression_steps=4))
    obj.times = generator_times(obj.config, sched)
    x_in = torch.randn(7, 2, dtype=torch.float64)
    t_in = torch.tensor([obj.times[0]] * 3 + [obj.times[1]] * 2 + [obj.times[2]] * 2, dtype=torch.float64)
    groups = [(0, slice(0, 3)), (1, slice(3, 5)), (2, slice(5, 7))]
    starts = []

    def solver(teacher, noise, grid, cond, **kw):
        starts.append(float(grid[0]))
        return noise * float(grid[0])  # a target that tells the groups' grids apart

    monkeypatch.setattr(dmd2, "get_registry", lambda: SimpleNamespace(
        get=lambda kind, name: SimpleNamespace(factory=solver)))
    weights = {0: 1.0, 1: 3.0, 2: 0.5}
    monkeypatch.setattr(obj, "step_weight", lambda k, ctx: weights[k])
    ctx = SimpleNamespace(teacher=SimpleNamespace(schedule=sched), batch={"cond": None},
                          cache={"dmd2.input": (x_in, t_in), "dmd2.groups": groups})
    x = torch.randn(7, 2, dtype=torch.float64)
    expect = 0.0
    for k, rows in groups:
        t0 = sched.t_max if k == 0 else obj.times[k]
        target = x_in[rows] / float(sched.sigma(torch.tensor(obj.times[k], dtype=torch.float64))) * t0
        expect += weights[k] * float((x[rows] - target).square().sum())
    torch.testing.assert_close(float(obj.regression_loss(ctx, x)), expect / x.numel(), rtol=1e-12, atol=0)
    assert starts == pytest.approx([sched.t_max, obj.times[1], obj.times[2]])


@pytest.mark.parametrize("setting,from_scratch,expect", [("auto", True, True), ("auto", False, False),
                                                          ("iteration", True, False), ("stratified", False, True)])
def test_step_sampling_auto_stratifies_generators_trained_from_scratch(setting, from_scratch, expect):
    obj = DMD2(DMD2Config(steps=4, step_sampling=setting))
    obj.from_scratch = from_scratch
    assert obj.stratified is expect


@pytest.mark.parametrize("setting,from_scratch,expect",
                         [(None, True, 2), (None, False, 5), (3, True, 3), (1, False, 1)])
def test_critic_ratio_defaults_to_two_from_scratch_and_dmd2s_five_for_a_teacher_copy(setting, from_scratch, expect):
    obj = DMD2(DMD2Config(critic_updates=setting))
    obj.from_scratch = from_scratch
    assert obj.critic_ratio == expect
    assert obj.phases()[0].every == expect and obj.phases()[1].every == 1


@pytest.mark.parametrize("total,K", [(3, 4), (2, 4), (1, 3)])
def test_stratified_batch_smaller_than_the_step_count_trains_the_steps_in_turn(total, K):
    """Fewer rows than steps: each iteration trains ``total`` distinct steps, ascending along the rows, and over K
    iterations every step gets exactly ``total`` rows."""
    from collections import Counter

    from plugins.dmd2 import step_groups

    counts = Counter()
    for n in range(K):
        groups = step_groups(K, total, 0, total, n)
        ks = [k for k, _ in groups]
        assert ks == sorted(set(ks)) and [r.stop - r.start for _, r in groups] == [1] * total
        counts.update(ks)
    assert counts == Counter({k: total for k in range(K)})


def test_one_k_per_iteration_passes_any_condition_through_whole():
    """step_sampling=iteration never splits the batch, so a condition of any type reaches the generator as is."""
    sched = make_schedule("edm")
    obj = DMD2(DMD2Config(steps=2, step_sampling="iteration"))
    obj.times = generator_times(obj.config, sched)
    teacher = type("T", (), {"data_shape": (2,), "schedule": sched})()
    cond = {"prompt_ids": [3, 1, 4, 1]}  # not a tensor: not splittable
    torch.manual_seed(0)
    for it in range(8):
        gen = ConstantGenerator(sched, 0.0)
        ctx = Context({"teacher": teacher, "student": gen}, {"x": None, "cond": cond}, it, 4, "cpu")
        obj.generator_input(ctx)
        assert all(c is cond for c in gen.cond_rows)
        if gen.calls:
            return
    raise AssertionError("k = 1 never drawn in 8 iterations")


def test_stratified_steps_reject_conditions_they_cannot_split():
    from plugins.dmd2 import condition_rows

    assert condition_rows(None, slice(0, 2)) is None
    with pytest.raises(UsageError, match="step_sampling=iteration"):
        condition_rows(["a prompt", "another"], slice(0, 1))


def test_backward_simulation_off_noises_real_data():
    sched = make_schedule("edm")
    obj = DMD2(DMD2Config(steps=2, backward_simulation=False))
    obj.times = generator_times(obj.config, sched)
    teacher = type("T", (), {"data_shape": (2,), "schedule": sched})()
    real = torch.full((2048, 2), 0.5)
    ks = set()
    for it in range(12):
        gen = ConstantGenerator(sched, 9.0)
        x_in, t_in = obj.generator_input(Context({"teacher": teacher, "student": gen}, {"x": real, "cond": None},
                                                 it, 2048, "cpu"))
        assert gen.calls == []  # no rollout
        k = 0 if float(t_in[0]) == pytest.approx(obj.times[0]) else 1
        ks.add(k)
        mean = 0.0 if k == 0 else 0.5
        assert abs(((x_in - mean) / float(t_in[0])).std() - 1) < 0.05
    assert ks == {0, 1}


# -- generator times and sampling specs ---------------------------------------------------------------------

def test_default_times_follow_dmd2():
    from core.schedules import VPDiscreteSchedule

    sd = VPDiscreteSchedule(torch.linspace(0.9999, 0.005, 1000))
    assert default_times(sd, 4) == [999.0, 749.0, 499.0, 249.0]  # DMD2's SDXL 4-step times
    edm = make_schedule("edm")
    assert default_times(edm, 1) == [pytest.approx(80.0)]
    assert default_times(edm, 2) == [pytest.approx(80.0), pytest.approx(float(edm.t_from_fraction(0.5)))]
    # on EDM the steps after the first refine from the lower half: fractions 1/2, 3/8, 1/4 (sigma 2.5, 0.74, 0.17)
    assert default_times(edm, 4) == pytest.approx([80.0, *(float(edm.t_from_fraction(f)) for f in (0.5, 0.375, 0.25))])
    assert default_times(edm, 4)[1:] == pytest.approx([2.5152, 0.7434, 0.16975], rel=1e-4)
    flow = make_schedule("flow")  # linear in t: DMD2's evenly spaced fractions
    assert default_times(flow, 4) == pytest.approx([float(flow.t_from_fraction(f)) for f in (1, 0.75, 0.5, 0.25)])
    obj = DMD2(DMD2Config(steps=1, timesteps=[399.0]))  # 1-step generator conditioned on t = 399
    assert generator_times(obj.config, sd) == [399.0]
    student = type("S", (), {"schedule": sd})()
    spec = obj.sampling(student)
    assert spec.sampler == "multistep" and spec.times == [399.0, 0.0]
    assert obj.with_steps(spec, 1, student) is spec
    assert obj.with_steps(spec, 4, student).times == [999.0, 749.0, 499.0, 249.0, 0.0]


def test_bad_timesteps_are_usage_errors():
    with pytest.raises(UsageError, match="timesteps"):
        run_config("objective.steps=2", "objective.timesteps=[10]")
    sched = make_schedule("edm")
    with pytest.raises(UsageError, match="decrease"):
        generator_times(DMD2Config(steps=2, timesteps=[1.0, 5.0]), sched)
    with pytest.raises(UsageError, match="range"):
        generator_times(DMD2Config(steps=1, timesteps=[500.0]), sched)
    with pytest.raises(UsageError, match="dm_t_range"):
        run_config("objective.dm_t_range=[0.5,0.2]")


# -- whole runs: conformance, network teachers, sampling from the CLI -----------------------------------------

def test_conformance():
    from core.testing import check

    check("objective", "dmd2")


@pytest.fixture(scope="module")
def tiny_teacher_run(tmp_path_factory):
    """A small (untrained-quality) network teacher: only its weights matter here."""
    out = tmp_path_factory.mktemp("dmd2-teacher") / "run"
    train("objective=denoise", "teacher=gmm", "teacher.preset=cls4", "student.hidden=32", "student.depth=2",
          "student.emb_dim=16", "train.steps=20", "train.batch=64", "train.eval_every=0", "train.preview_every=0",
          "train.eval_samples=64", f"out={out}")
    return str(out)


def test_network_teacher_initialises_generator_and_critic_from_its_weights(tiny_teacher_run, tmp_path):
    from core.roles import Networks

    cfg = run_config("teacher=checkpoint", f"teacher.path={tiny_teacher_run}", "objective.guidance=2",
                     f"out={tmp_path}/run")
    nets = Networks(cfg).nets
    assert cfg.student.name == "copy" and cfg.critic.name == "fake-score"
    teacher_sd = nets["teacher"].net.state_dict()
    for role in ("student", "critic"):
        sd = nets[role].state_dict()
        assert sd.keys() == teacher_sd.keys() and all(torch.equal(sd[k], teacher_sd[k]) for k in sd), role
    assert nets["student"] is not nets["critic"]
    res = train("teacher=checkpoint", f"teacher.path={tiny_teacher_run}", "objective.guidance=2", "train.steps=6",
                "train.batch=16", "train.eval_every=3", "train.log_every=3", "train.eval_samples=64",
                "train.preview_every=0", "objective.steps=2", f"out={tmp_path}/run")
    assert np.isfinite(res["metrics"]["energy_distance"])
    from core.sample import main as sample

    assert sample([f"run={tmp_path}/run", "num=40", "label=1", f"out={tmp_path}/x.npz"]) == 0
    assert (np.load(tmp_path / "x.npz")["labels"] == 1).all()


@pytest.mark.parametrize("steps", [1, 3])
def test_cli_samples_one_and_k_step_students(tmp_path, capsys, steps):
    from core.sample import main as sample

    run = tmp_path / "run"
    train(*TINY, "train.steps=4", f"objective.steps={steps}", f"out={run}")
    assert sample([f"run={run}", "num=50", f"out={tmp_path}/x.npz"]) == 0
    assert f"multistep, {steps} steps" in capsys.readouterr().out
    assert np.load(tmp_path / "x.npz")["samples"].shape == (50, 2)
    assert sample([f"run={run}", "num=20", "steps=2", f"out={tmp_path}/y.npz"]) == 0
    assert "multistep, 2 steps" in capsys.readouterr().out


# -- the regression target: the guided teacher's ODE image of the generator's own noise --------------------------

class GuidedGaussianTeacher:
    """The exact CFG denoiser on EDM for class-conditional data N(mu_c, V) with unconditional data N(0, V):
    x0_u + w (x0_c - x0_u) = (w mu_c sigma^2 + V x) / (V + sigma^2), the denoiser of N(w mu_c, V); w defaults to
    the teacher's own scale 2.5 (a guidance of None means w = 1); without labels it is x0_u = V x / (V + sigma^2)."""

    V, data_shape, sigma_data, guidance = 0.6, (2,), 0.5, 2.5
    MU = torch.tensor([[1.0, -0.5], [-0.8, 0.3], [0.2, 1.1], [-1.2, -0.9]], dtype=torch.float64)

    def __init__(self):
        self.schedule = make_schedule("edm")
        self.guidance_seen, self.times = set(), []

    def denoise(self, x_t, t, cond=None, guidance=None):
        self.guidance_seen.add(guidance)
        self.times.append(t)
        s2 = t.to(x_t.dtype)[:, None] ** 2
        mean = 0.0 if cond is None else (1.0 if guidance is None else guidance) * self.MU[cond].to(x_t.dtype)
        return (mean * s2 + self.V * x_t) / (self.V + s2)


@pytest.fixture
def float64_default():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize(("guidance", "labelled"), [(None, True), (4.0, True), (None, False)])
@pytest.mark.parametrize("batch", [1, 16])
def test_one_step_regression_target_is_the_full_ode_image_of_the_noise(guidance, labelled, batch, float64_default):
    """For N(m, V) data (m = w mu_c) the PF-ODE from x at sigma_0 to 0 ends at m + (x - m) sqrt(V / (V + sigma_0^2))
    (closed form). A 1-step generator conditioned on tau_0 = 2 sees sigma(2) z, pure noise; its target is the
    teacher's ODE image of that z from sigma_max (DMD2's 1-step SDXL recipe: ODE pairs from T, the generator at
    t = 399), not the ODE from sigma = 2 (where 2 z is not a noisy sample), on the batch's labels, with the
    objective's guidance scale, else the teacher's, and no guidance argument without labels; regression_loss
    (x = that closed form) is then ~0 (128 DPM-Solver++(2M) steps from sigma_max)."""
    teacher = GuidedGaussianTeacher()
    obj = DMD2(DMD2Config(gan="off", timesteps=[2.0], regression_weight=1.0, regression_steps=128, guidance=guidance))
    nets = {"teacher": teacher, "student": RawNet(teacher.schedule, "x0", 2, seed=40),
            "critic": RawCritic(teacher.schedule, "x0", 2, seed=41)}
    obj.build(nets)
    cond = torch.arange(batch) % 4 if labelled else None
    ctx = Context(nets, {"x": None, "cond": cond}, iteration=0, batch_size=batch, device="cpu")
    x_in, t_in = obj.generator_input(ctx)
    assert torch.equal(t_in, torch.full((batch,), 2.0))
    w = 2.5 if guidance is None else guidance
    m = w * teacher.MU[cond] if labelled else torch.zeros(2)
    sigma_max = teacher.schedule.t_max
    closed_form = m + (x_in / 2.0 * sigma_max - m) * math.sqrt(teacher.V / (teacher.V + sigma_max**2))
    from_tau_0 = m + (x_in - m) * math.sqrt(teacher.V / (teacher.V + 2.0**2))  # the old, wrong target
    reg = obj.regression_loss(ctx, closed_form)
    assert teacher.guidance_seen == ({w} if labelled else {None})
    assert float(teacher.times[0][0]) == sigma_max
    assert float(reg) < 1e-6 * float(closed_form.square().mean())
    gap = float((from_tau_0 - closed_form).square().mean())
    assert float(obj.regression_loss(ctx, from_tau_0)) > 0.5 * gap > 5e-4


def test_critic_phase_trains_on_the_generator_phases_sample(float64_default):
    """In an iteration with both phases, the critic's L_fake is on the very x the generator phase made (before its
    update), not on a second generator pass; a critic-only iteration makes x once, and keeps it for the iteration."""
    teacher = GuidedGaussianTeacher()
    student = RawNet(teacher.schedule, "x0", 2, seed=50)
    nets = {"teacher": teacher, "student": student, "critic": RawCritic(teacher.schedule, "x0", 2, seed=51)}
    obj = DMD2(DMD2Config(gan="off", regression_weight=0.0))
    obj.build(nets)
    ctx = Context(nets, {"x": None, "cond": None}, iteration=0, batch_size=8, device="cpu")
    obj.loss("generator", ctx)
    calls, x = len(student.calls), ctx.cache["dmd2.x"]
    obj.loss("critic", ctx)
    assert len(student.calls) == calls and ctx.cache["dmd2.x"] is x
    ctx = Context(nets, {"x": None, "cond": None}, iteration=1, batch_size=8, device="cpu")
    obj.loss("critic", ctx)
    calls, x = len(student.calls), ctx.cache["dmd2.x"]
    obj.loss("critic", ctx)
    assert len(student.calls) == calls and ctx.cache["dmd2.x"] is x and x.shape == (8, 2)


def test_fake_score_draws_replayed_from_the_seed_and_the_teachers_sigma_data():
    """L_fake's t = t_from_fraction(u), u ~ U(0, 1) drawn in float64 whatever the batch's dtype (Karras spacing on
    EDM, written out here), handed to the critic in the batch's dtype; x_t = x + sigma eps; a critic that declares
    no sigma_data is weighted with the teacher's: lambda = 1/sigma^2 + 1/sigma_d^2, sigma_d = 1.3."""
    teacher, critic = GuidedGaussianTeacher(), GuidedGaussianTeacher()
    teacher.sigma_data, critic.sigma_data = 1.3, None
    x = torch.randn(256, 2)
    torch.manual_seed(3)
    loss = DMD2(DMD2Config(gan="off")).fake_score_loss(x, None, critic, teacher)
    torch.manual_seed(3)
    u = torch.rand(256, dtype=torch.float64)
    sigma = (0.002 ** (1 / 7) + u * (80.0 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    eps = torch.randn(256, 2)
    (t,) = critic.times
    assert t.dtype == torch.float32
    torch.testing.assert_close(t.double(), sigma, rtol=2e-7, atol=0)
    x_t = (x + sigma.float()[:, None] * eps).double()
    d = critic.V * x_t / (critic.V + t.double()[:, None] ** 2)
    lam = 1 / sigma**2 + 1 / 1.3**2
    torch.testing.assert_close(loss.double(), (lam * (d - x.double()).square().mean(1)).mean(), rtol=1e-5, atol=0)


def test_dm_loss_times_are_float64_draws_on_a_float32_batch():
    """L_DM's t = t_from_fraction(lo + (hi - lo) u) with u drawn in float64 whatever the batch's dtype."""
    teacher, critic, x = GuidedGaussianTeacher(), GuidedGaussianTeacher(), torch.randn(128, 2)
    torch.manual_seed(5)
    DMD2(DMD2Config(gan="off", dm_t_range=(0.1, 0.6))).distribution_matching_loss(x, None, teacher, critic)
    torch.manual_seed(5)
    u = 0.1 + 0.5 * torch.rand(128, dtype=torch.float64)
    sigma = (0.002 ** (1 / 7) + u * (80.0 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    torch.testing.assert_close(teacher.times[0].double(), sigma, rtol=2e-7, atol=0)
