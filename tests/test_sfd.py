"""SFD / SFD-v: the iteration follows the paper's algorithm (teacher DPM-Solver++(3M) targets on the nested
grid, the student's own detached Euler chain, one update per student step, AFS without a call), and the
distilled student beats the teacher network's own solver at the same NFE on exact ring8 samples."""

import math

import pytest
import torch

from conftest import run_config, train
from core.errors import UsageError
from core.metrics import energy_distance
from core.protocols import Context
from core.rundir import load_run
from core.runner import Trainer
from core.generation import generate
from core.timesteps import make_grid, nested_grids
from plugins.samplers.ode import dpmpp_3m
from core.networks import DenoiserNet, ResidualMLP
from core.schedules import make_schedule
from plugins.gmm import GaussianMixtureTeacher, GMMConfig
from plugins.sfd import (SFD, CopyNFEConfig, NFEConditioned, SFD1Config, SFDConfig, SFDVConfig,
                         copy_nfe_student)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A barely trained network teacher: enough for the mechanics (quality tests use ring8_teacher_run)."""
    out = tmp_path_factory.mktemp("tiny-teacher") / "run"
    train("objective=denoise", "teacher=gmm", "teacher.preset=cls4", "train.steps=3", "train.batch=64",
          "train.eval_every=0", "train.preview_every=0", "train.eval_samples=64", f"out={out}")
    return str(out)


def _trainer(teacher, tmp_path, *extra):
    cfg = run_config("objective=sfd", "teacher=checkpoint", f"teacher.path={teacher}", f"out={tmp_path / 'sfd'}",
                     "train.batch=32", *extra)
    trainer = Trainer(cfg)
    trainer.build()
    return trainer


@pytest.mark.parametrize("loss,afs", [("l1", True), ("l2", False)])
def test_iteration_follows_the_algorithm(tiny_teacher, tmp_path, loss, afs):
    tr = _trainer(tiny_teacher, tmp_path, "objective.nfe=2", f"objective.loss={loss}", f"objective.afs={afs}")
    obj, teacher, student = tr.objective, tr.teacher, tr.student
    assert tr.phases[0].repeats == 1
    batch = {"x": None, "cond": teacher.encode_condition(torch.randint(0, 4, (32,)))}
    ctx = Context(tr.nets, batch, 0, 32, "cpu")
    state = torch.get_rng_state()
    # the losses without optimizer steps (the student stays the teacher copy): one per student network call
    losses = [value for value, _ in obj.loss("student", ctx)]
    assert len(losses) == 2
    torch.set_rng_state(state)
    noise = torch.randn(32, *teacher.data_shape)  # the iteration's only draw: its fresh noise
    cond = batch["cond"]
    # student grid: EDM rho=7 from sigma_max to 0.006, N = NFE + 1 (+1 with AFS), no denoise-to-zero
    n = 2 + 1 + int(afs)
    want = [(80 ** (1 / 7) + i / (n - 1) * (0.006 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(n)]
    times = torch.tensor(tr.spec.times, dtype=torch.float64)
    assert times.tolist() == pytest.approx(want, rel=1e-9)
    # targets: the teacher's DPM-Solver++(3M) on the grid with M = 3 extra points per interval
    coarse, fine = nested_grids(teacher.schedule, n, 3, t_min=0.006)
    assert len(fine) == 4 * (n - 1) + 1
    # (dpmpp_3m itself is checked step by step against a written-out reference in test_reference_samplers.py)
    _, traj = dpmpp_3m(teacher, noise, fine, cond, return_trajectory=True)
    # the student's chain: Euler on the EDM PF-ODE, x' = x + (s' - s) (x - D(x; s)) / s, from its own previous
    # output; with AFS the first direction is x / sqrt(1 + s^2) instead of a network call (SFD sec. 4)
    chain = [times[0].item() * noise]
    with torch.no_grad():
        for i in range(n - 1):
            s_i, s_next, x = times[i].item(), times[i + 1].item(), chain[-1]
            if afs and i == 0:
                d = x / math.sqrt(1 + s_i**2)
            else:
                d = (x - student.denoise(x, torch.full((32,), s_i), cond)) / s_i
            chain.append(x + (s_next - s_i) * d)
    first = int(afs)
    for r, value in enumerate(losses):
        i = first + r + 1
        diff = chain[i] - traj[4 * i]
        ref = diff.abs().mean() if loss == "l1" else diff.square().mean()
        torch.testing.assert_close(value.detach(), ref, rtol=2e-4, atol=1e-7)  # float32 rounding of two forms
        assert value.requires_grad


@pytest.mark.parametrize("afs", [True, False])
def test_iteration_on_a_vp_schedule_divides_by_each_steps_own_alpha(afs):
    """On VP (alpha < 1) the chain runs in y = x / alpha: y_i = x_i / alpha_i, y' = y + (s' - s)(y - D) / s with
    D = D(alpha_i y_i; t_i) (AFS: D = y (1 - s / sqrt(1 + s^2)) at i = 0), x_{i+1} = alpha_{i+1} y'. A
    class-conditional teacher without labels in the batch draws them, before the noise."""
    teacher = GaussianMixtureTeacher(GMMConfig(preset="cls4", schedule="vp-cosine"))
    torch.manual_seed(0)
    student = DenoiserNet(ResidualMLP(2, 16, 2, 8, num_classes=4), teacher.schedule, "edm", teacher.sigma_data)
    obj, nets = SFD(SFDConfig(nfe=2, afs=afs)), {"teacher": teacher, "student": student}
    obj.build(nets)
    state = torch.get_rng_state()
    losses = [value for value, _ in obj.loss("student", Context(nets, {"x": None, "cond": None}, 0, 16, "cpu"))]
    torch.set_rng_state(state)
    cond = torch.randint(0, 4, (16,))
    noise = torch.randn(16, 2)
    times = torch.tensor(obj.with_steps(None, 2, student).times, dtype=torch.float64)
    _, fine = nested_grids(teacher.schedule, len(times), 3, t_min=float(times[-1]))
    _, traj = dpmpp_3m(teacher, noise, fine, cond, return_trajectory=True)
    alpha, sigma = teacher.schedule.alpha(times), teacher.schedule.sigma(times)
    assert float(alpha.min()) < 0.99  # the case the test is about
    x = traj[0].double()
    with torch.no_grad():
        for i in range(len(times) - 1):
            a, s, s_next = float(alpha[i]), float(sigma[i] / alpha[i]), float(sigma[i + 1] / alpha[i + 1])
            y = x / a
            d = y / math.sqrt(1 + s * s) if afs and i == 0 else \
                (y - student.denoise(x.float(), times[i].expand(16), cond).double()) / s
            x = float(alpha[i + 1]) * (y + (s_next - s) * d)
            if i >= int(afs):
                ref = (x - traj[4 * (i + 1)].double()).abs().mean()
                torch.testing.assert_close(losses[i - int(afs)].detach().double(), ref, rtol=2e-4, atol=1e-7)
    assert len(losses) == 2


def test_teacher_solver_options_and_sigma_range():
    # the first stage runs the pretrained network's solver without AFS; the second stage runs the first-stage
    # model's Euler with AFS as it was trained (teacher_afs), and no other solver takes AFS
    assert SFD(SFDConfig(teacher_solver="euler-afs")).teacher_options == {"afs": False}
    assert SFD(SFDConfig()).teacher_options == {}
    assert SFD(SFD1Config()).teacher_options == {"afs": True}
    assert SFD(SFD1Config(teacher_afs=False)).teacher_options == {"afs": False}
    assert SFD(SFD1Config(teacher_solver="dpmpp-3m")).teacher_options == {}
    with pytest.raises(ValueError, match=r"sigma_max \(1.0\) must exceed sigma_min \(1.0\)"):
        SFDConfig(sigma_min=1.0, sigma_max=1.0)


@pytest.mark.parametrize("schedule", ["edm", "vp-cosine"])
def test_student_grid_spans_the_configured_ve_sigmas(schedule):
    student = DenoiserNet(ResidualMLP(2, 16, 2, 8), make_schedule(schedule), "edm", 0.5)
    times = torch.tensor(SFD(SFDConfig(sigma_min=0.01, sigma_max=2.3)).with_steps(None, 2, student).times,
                         dtype=torch.float64)
    ve = student.schedule.sigma(times) / student.schedule.alpha(times)  # sigma / alpha, in float64 throughout
    torch.testing.assert_close(ve[[0, -1]], torch.tensor([2.3, 0.01], dtype=torch.float64), rtol=1e-12, atol=0)


def test_students_that_do_not_fit_the_method_are_usage_errors():
    teacher = GaussianMixtureTeacher(GMMConfig())
    plain = DenoiserNet(ResidualMLP(2, 16, 2, 8), teacher.schedule, "edm", 0.5)
    with pytest.raises(UsageError, match="^objective=sfd-v needs a step-conditioned student; pass student=copy-nfe$"):
        SFD(SFDVConfig()).build({"teacher": teacher, "student": plain})
    elsewhere = DenoiserNet(ResidualMLP(2, 16, 2, 8), make_schedule("vp-cosine"), "edm", 0.5)
    with pytest.raises(UsageError, match="^objective=sfd needs the student on the teacher's schedule; "
                                         "use student=copy$"):
        SFD(SFDConfig()).build({"teacher": teacher, "student": elsewhere})


def test_one_adam_step_per_student_step(tiny_teacher, tmp_path):
    res = train("objective=sfd", "teacher=checkpoint", f"teacher.path={tiny_teacher}", "objective.nfe=3",
                "train.steps=2", "train.batch=16", "train.eval_every=0", "train.eval_samples=64",
                f"out={tmp_path / 'run'}")
    opt = res["trainer"].optimizers["student"]
    steps = {int(s["step"]) for s in opt.state.values()}
    assert steps == {2 * 3}  # 2 iterations x 3 trained student steps (AFS step 0 takes no update)
    spec = res["trainer"].spec
    assert spec.sampler == "euler-afs" and len(spec.times) == 3 + 2 and spec.times[-1] == pytest.approx(0.006)


def test_sfd_v_student_starts_as_teacher_and_draws_nfe(tiny_teacher, tmp_path, capsys):
    tr = _trainer(tiny_teacher, tmp_path, "objective=sfd-v", "student=copy-nfe", "objective.nfe_min=2",
                  "objective.nfe_max=4", "objective.nfe=3")
    student, teacher = tr.student, tr.teacher
    assert isinstance(student, NFEConditioned)
    x, t = torch.randn(8, 2), torch.full((8,), 1.3)
    c = torch.randint(0, 4, (8,))
    for k in (2, 3, 4, None):  # zero-initialised step layers: exactly the teacher
        torch.testing.assert_close(student.denoise(x, t, c, nfe=k), teacher.denoise(x, t, c))
    seen = set()
    for it in range(20):
        ctx = Context(tr.nets, {"x": None, "cond": None}, it, 8, "cpu")
        steps = list(tr.objective.loss("student", ctx))
        nfe = steps[0][1]["nfe"]
        assert len(steps) == nfe and all(loss.requires_grad for loss, _ in steps)  # one update per drawn NFE
        seen.add(nfe)
    assert seen == {2, 3, 4}
    # the NFE input is live: one gradient step makes the outputs depend on it
    next(tr.objective.loss("student", ctx))[0].backward()
    assert student.nfe_embed[-1].weight.grad.abs().sum() > 0
    spec = tr.objective.with_steps(None, 3, student)
    capsys.readouterr()
    tr.objective.with_steps(spec, 2, student), tr.objective.with_steps(spec, 4, student)  # the range's ends
    assert capsys.readouterr().err == ""
    tr.objective.with_steps(spec, 5, student)
    assert "distilled for NFE 2-4; steps=5 runs it off its training grid" in capsys.readouterr().err


def test_sfd_v_sample_cli_picks_the_nfe(tiny_teacher, tmp_path):
    from core.sample import main

    out = tmp_path / "v"
    train("objective=sfd-v", "student=copy-nfe", "teacher=checkpoint", f"teacher.path={tiny_teacher}",
          "train.steps=2", "train.batch=16", "train.eval_every=0", "train.eval_samples=64", f"out={out}")
    networks, spec, _ = load_run(str(out))
    assert spec.options["model_kwargs"] == {"nfe": 2}
    spec4 = networks.objective.with_steps(spec, 4, networks.student)
    assert len(spec4.times) == 6 and spec4.options == {"afs": True, "model_kwargs": {"nfe": 4}}
    calls = []
    orig = networks.student.denoise
    networks.student.denoise = lambda *a, **k: calls.append(k.get("nfe")) or orig(*a, **k)
    generate(networks.student, spec4, 10, torch.zeros(10, dtype=torch.long), shape=(2,))
    assert calls == [4] * 4
    assert main([f"run={out}", "num=20", "steps=5", f"out={tmp_path / 's.npz'}"]) == 0


def test_bad_settings_are_usage_errors(tiny_teacher, tmp_path):
    with pytest.raises(UsageError, match="student=copy-nfe"):
        _trainer(tiny_teacher, tmp_path, "objective=sfd-v", "student=copy")
    assert _trainer(tiny_teacher, tmp_path / "auto", "objective=sfd-v").cfg.student.name == "copy-nfe"
    with pytest.raises(UsageError, match="below the schedule's range"):
        _trainer(tiny_teacher, tmp_path, "objective.sigma_min=0.0001")
    with pytest.raises(UsageError, match="nfe_min"):
        run_config("objective=sfd-v", "objective.nfe=7", "teacher=checkpoint", f"teacher.path={tiny_teacher}")
    with pytest.raises(UsageError, match="objective.loss"):
        run_config("objective=sfd", "objective.loss=huber", "teacher=checkpoint", f"teacher.path={tiny_teacher}")


# -- SFD-v's NFE conditioning, written out -----------------------------------------------------------------
def _mlp_net(seed=0):
    torch.manual_seed(seed)
    return DenoiserNet(ResidualMLP(2, 16, 2, 8), make_schedule("edm"), "edm", 0.5).double()


def test_nfe_embedding_is_sinusoidal_features_through_the_mlp():
    net = NFEConditioned(_mlp_net())  # 32 features by default
    torch.nn.init.normal_(net.nfe_embed[-1].weight), torch.nn.init.normal_(net.nfe_embed[-1].bias)
    net = net.double()
    angle = 3.0 * 100.0 ** (-torch.arange(16, dtype=torch.float64) / 16)  # frequencies 100^(-k/16)
    features = torch.cat([angle.cos(), angle.sin()]).expand(4, 32)
    first, last = net.nfe_embed[0], net.nfe_embed[2]
    hidden = torch.nn.functional.silu(features @ first.weight.T + first.bias)
    expect = hidden @ last.weight.T + last.bias
    assert expect.shape == (4, 16)  # the width of the MLP's time embedding
    torch.testing.assert_close(net.nfe_embedding(3, 4, "cpu"), expect, rtol=1e-5, atol=1e-6)


class GainBackbone(torch.nn.Module):
    """A backbone with one keyword of its own besides extra_emb."""

    emb_width = 2

    def forward(self, x, c_noise, cond=None, extra_emb=None, gain=1.0):
        return gain * (x if extra_emb is None else x + extra_emb)


def test_nfe_conditioned_denoise_passes_the_denoisers_keywords_on():
    inner = DenoiserNet(GainBackbone(), make_schedule("edm"), "edm", 0.5).double()
    net = NFEConditioned(inner).double()
    torch.nn.init.normal_(net.nfe_embed[-1].bias)
    x, t = torch.randn(3, 2, dtype=torch.float64), torch.full((3,), 1.5, dtype=torch.float64)
    expect = inner.denoise(x, t, None, extra_emb=net.nfe_embedding(2, 3, "cpu"), gain=3.0)
    torch.testing.assert_close(net.denoise(x, t, None, nfe=2, gain=3.0), expect)
    torch.testing.assert_close(net.denoise(x, t, None, gain=3.0), inner.denoise(x, t, None, gain=3.0))


def test_calling_an_nfe_conditioned_net_is_its_denoise():
    net = NFEConditioned(DenoiserNet(GainBackbone(), make_schedule("edm"), "edm", 0.5).double()).double()
    torch.nn.init.normal_(net.nfe_embed[-1].bias)
    x, t = torch.randn(3, 2, dtype=torch.float64), torch.full((3,), 1.5, dtype=torch.float64)
    torch.testing.assert_close(net(x, t, None, nfe=2, gain=3.0), net.denoise(x, t, None, nfe=2, gain=3.0))


@pytest.mark.parametrize("emb_dim", [3, 0, -2])
def test_copy_nfe_wants_an_even_positive_embedding(emb_dim):
    from core.config import FieldError

    with pytest.raises(FieldError, match=f"^must be an even number > 0 \\(a cos and a sin per frequency\\), "
                                         f"got {emb_dim}$") as info:
        CopyNFEConfig(emb_dim=emb_dim)
    assert info.value.field == "emb_dim"
    assert CopyNFEConfig(emb_dim=4).emb_dim == 4


def test_nfe_embedding_is_made_on_the_device_asked_for():
    """On PyTorch's meta device (a stand-in for a GPU here): the NFE tensor is made there, not on the CPU."""
    net = NFEConditioned(_mlp_net()).to("meta")
    assert net.nfe_embedding(3, 4, "meta").device.type == "meta"


def test_nfe_conditioned_sizes_its_embedding_from_a_unet_time_embedding():
    pytest.importorskip("diffusers", reason="the unet student needs the diffusers extra")
    from plugins.unet import UNetBackbone, UNetConfig

    backbone = UNetBackbone((1, 8, 8), 0, UNetConfig(channels=[8], attention=[]))
    net = NFEConditioned(DenoiserNet(backbone, make_schedule("edm"), "edm", 0.5))
    assert net.nfe_embed[-1].out_features == backbone.emb_width == backbone.unet.time_embedding.linear_2.out_features


def test_copy_nfe_students_need_a_network_teacher_with_extra_emb():
    class NetTeacher:
        def trainable_copy(self):
            return _mlp_net()

    student = copy_nfe_student(CopyNFEConfig(), NetTeacher())  # on the CPU by default
    assert isinstance(student, NFEConditioned) and student.freqs.device.type == "cpu"
    with pytest.raises(UsageError, match="^student=copy-nfe needs a teacher with a network; "
                                         "GaussianMixtureTeacher has none$"):
        copy_nfe_student(CopyNFEConfig(), GaussianMixtureTeacher(GMMConfig()))
    with pytest.raises(UsageError, match=r"^student=copy-nfe needs a teacher network whose backbone takes "
                                         r"extra_emb \(core.networks.ResidualMLP, plugins.unet\); this teacher's "
                                         r"does not$"):
        NFEConditioned(torch.nn.Linear(2, 2))


# -- quality on ring8 (the network teacher from the session fixture) -------------------------------------
def _ed_student(run, nfe, n, ref):
    networks, spec, _ = load_run(run)
    spec = networks.objective.with_steps(spec, nfe, networks.student)
    torch.manual_seed(1)
    return energy_distance(generate(networks.student, spec, n, shape=(2,)), ref)


def _ed_teacher_dpmpp(teacher, nfe, n, ref):
    """The teacher network's DPM-Solver++(3M) at this NFE: the better of ending at sigma 0.006 or
    denoising to 0 from the last of ``nfe`` timestamps."""
    torch.manual_seed(1)
    z = torch.randn(n, 2)
    grids = [make_grid(teacher.schedule, nfe + 1, t_min=0.006, append_zero=False),
             make_grid(teacher.schedule, nfe, t_min=0.006)]
    return min(energy_distance(dpmpp_3m(teacher, z, g), ref) for g in grids)


@pytest.mark.slow
def test_sfd_nfe2_beats_teacher_solver(ring8_teacher_run, tmp_path):
    out = str(tmp_path / "sfd")
    res = train("objective=sfd", "teacher=checkpoint", f"teacher.path={ring8_teacher_run}", "objective.nfe=2",
                "train.eval_every=0", "train.eval_samples=256", f"out={out}")  # SFD's default budget
    teacher = res["trainer"].teacher
    torch.manual_seed(123)
    n = 3000
    ref = teacher.sample_exact(n)
    student = _ed_student(out, 2, n, ref)
    t2, t3 = _ed_teacher_dpmpp(teacher, 2, n, ref), _ed_teacher_dpmpp(teacher, 3, n, ref)
    assert student < 0.5 * min(t2, t3), (student, t2, t3)


@pytest.mark.slow
def test_sfd_v_improves_with_nfe(ring8_teacher_run, tmp_path):
    out = str(tmp_path / "sfdv")
    res = train("objective=sfd-v", "student=copy-nfe", "teacher=checkpoint", f"teacher.path={ring8_teacher_run}",
                "train.eval_every=0", "train.eval_samples=256", f"out={out}")  # SFD-v's default budget
    teacher = res["trainer"].teacher
    torch.manual_seed(123)
    n = 3000
    ref = teacher.sample_exact(n)
    floor = max(abs(energy_distance(teacher.sample_exact(n), ref)) for _ in range(3))
    eds = [_ed_student(out, k, n, ref) for k in (2, 3, 4, 5)]
    t2 = _ed_teacher_dpmpp(teacher, 2, n, ref)
    slack = 2 * floor + 1e-3  # "within noise"
    assert all(b <= a + slack for a, b in zip(eds, eds[1:])), (eds, floor)
    assert eds[-1] < eds[0] and eds[0] < 0.5 * t2, (eds, t2)
    assert not math.isnan(sum(eds))
