"""SFD's second stage (``objective=sfd-1``, note sec. 7): the 1-NFE student regresses onto a first-stage SFD-v
model's own Euler (+AFS) trajectory on the 7-point grid, and beats the teacher's 4-step Euler on ring8; the
optional LPIPS term loads VGG weights only from the user's file and matches the LPIPS formula."""

import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import run_config, train
from core.errors import UsageError
from core.files import save_tensors
from core.generation import generate
from core.metrics import energy_distance
from core.protocols import Context, SamplingSpec
from core.rundir import load_run
from core.runner import Trainer
from core.timesteps import make_grid
from plugins.perceptual import LPIPS, load_lpips, lpips_term
from plugins.sfd import NFEConditioned

VGG_CONVS = {1: (0, 2), 2: (5, 7), 3: (10, 12, 14), 4: (17, 19, 21), 5: (24, 26, 28)}  # torchvision vgg16.features
VGG_WIDTHS = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory):
    """A barely trained SFD-v model (mechanics only) on a barely trained cls4 network teacher."""
    root = tmp_path_factory.mktemp("first-stage")
    quiet = ("train.eval_every=0", "train.preview_every=0", "train.eval_samples=64")
    train("objective=denoise", "teacher=gmm", "teacher.preset=cls4", "train.steps=3", "train.batch=64", *quiet,
          f"out={root / 'teacher'}")
    train("objective=sfd-v", "teacher=checkpoint", f"teacher.path={root / 'teacher'}", "train.steps=2",
          "train.batch=16", *quiet, f"out={root / 'sfdv'}")
    return str(root / "sfdv")


def _grid(n, lo=0.006, hi=80.0):
    return [(hi ** (1 / 7) + i / (n - 1) * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7 for i in range(n)]


def _euler_afs(denoise, x, sigmas):
    """Euler on the VE PF-ODE, x' = x + (s' - s) d, whose first direction is AFS's x / sqrt(1 + s^2)."""
    states = [x]
    for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
        d = x / math.sqrt(1 + s * s) if i == 0 else (x - denoise(x, s)) / s
        x = x + (s_next - s) * d
        states.append(x)
    return states


def test_iteration_regresses_onto_the_first_stage_euler_trajectory(first_stage, tmp_path):
    tr = Trainer(run_config("objective=sfd-1", "teacher=checkpoint", f"teacher.path={first_stage}",
                            "train.batch=32", f"out={tmp_path / 'sfd1'}"))
    tr.build()
    first, student = tr.teacher.net, tr.student
    assert isinstance(first, NFEConditioned) and isinstance(student, NFEConditioned)  # student=copy of SFD-v
    # N = 3 student timestamps (AFS + one network call), M = 2: the teacher grid has 7 = (M+1)(N-1)+1
    assert tr.spec.times == pytest.approx(_grid(3), rel=1e-9)
    assert tr.spec.options == {"afs": True, "model_kwargs": {"nfe": 1}}
    cond = tr.teacher.encode_condition(torch.randint(0, 4, (32,)))
    ctx = Context(tr.nets, {"x": None, "cond": cond}, 0, 32, "cpu")
    state = torch.get_rng_state()
    losses = [value for value, _ in tr.objective.loss("student", ctx)]
    assert len(losses) == 1 and losses[0].requires_grad  # one trained step, one update
    torch.set_rng_state(state)
    x_T = 80.0 * torch.randn(32, 2)
    fine = _grid(7)
    with torch.no_grad():  # the first-stage model samples at NFE 5 (7 timestamps, AFS), conditioned on it
        target = _euler_afs(lambda x, s: first.denoise(x, torch.full((32,), s), cond, nfe=5), x_T, fine)[-1]
        out = _euler_afs(lambda x, s: student.denoise(x, torch.full((32,), s), cond, nfe=1), x_T, fine[::3])[-1]
    torch.testing.assert_close(losses[0].detach(), (out - target).abs().mean(), rtol=2e-4, atol=1e-7)


def test_second_stage_trains_and_samples_at_one_nfe(first_stage, tmp_path):
    res = train("objective=sfd-1", "teacher=checkpoint", f"teacher.path={first_stage}", "train.steps=3",
                "train.batch=16", "train.eval_every=0", "train.eval_samples=64", f"out={tmp_path / 'run'}")
    steps = {int(s["step"]) for s in res["trainer"].optimizers["student"].state.values()}
    assert steps == {3}
    networks, spec, _ = load_run(str(tmp_path / "run"))
    calls = []
    generate(networks.student, spec, 8, networks.teacher.encode_condition(torch.zeros(8, dtype=torch.long)),
             shape=(2,), callback=lambda info: calls.append(info["nfe"]))
    assert calls[-1] == 1


# -- LPIPS ----------------------------------------------------------------------------------------------------

def _random_lpips_state(seed=0):
    """Random weights in the lpips package's LPIPS(net='vgg') layout (what users save from the package)."""
    g = torch.Generator().manual_seed(seed)
    state, c_in = {}, 3
    for k, convs in VGG_CONVS.items():
        for i in convs:
            w = VGG_WIDTHS[k]
            state[f"net.slice{k}.{i}.weight"] = torch.randn(w, c_in, 3, 3, generator=g) * math.sqrt(2 / (9 * c_in))
            state[f"net.slice{k}.{i}.bias"] = 0.1 * torch.randn(w, generator=g)
            c_in = w
        state[f"lin{k - 1}.model.1.weight"] = torch.rand(1, VGG_WIDTHS[k], 1, 1, generator=g)
    state["scaling_layer.shift"] = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
    state["scaling_layer.scale"] = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]
    return state


def _reference_lpips(state, x, y):
    """LPIPS written out from Zhang et al. 2018 eq. 1 on the package's state dict."""
    def feats(z):
        h, out = (z - state["scaling_layer.shift"]) / state["scaling_layer.scale"], []
        for k, convs in VGG_CONVS.items():
            if k > 1:
                h = F.max_pool2d(h, kernel_size=2, stride=2)
            for i in convs:
                h = F.relu(F.conv2d(h, state[f"net.slice{k}.{i}.weight"], state[f"net.slice{k}.{i}.bias"], padding=1))
            out.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    return sum((state[f"lin{k}.model.1.weight"][0, :, 0, 0][None, :, None, None] * (a - b) ** 2).sum(1).mean((1, 2))
               for k, (a, b) in enumerate(zip(feats(x), feats(y))))


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lpips")
    state = _random_lpips_state()
    torch.save(state, root / "vgg.pth")
    save_tensors(str(root / "vgg.safetensors"), {k: v.contiguous() for k, v in state.items()})
    return state, root


@pytest.mark.parametrize("name", ["vgg.pth", "vgg.safetensors"])
def test_lpips_matches_the_formula_on_user_weights(lpips_files, name):
    state, root = lpips_files
    model = load_lpips(str(root / name))
    x, y = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(model(x, y), _reference_lpips(state, x, y), rtol=1e-4, atol=1e-6)
    assert model(x, x).abs().max() < 1e-6
    grey = torch.rand(2, 1, 16, 16, requires_grad=True)  # one channel, upsampled: SFD's last-step term
    value = lpips_term(model, grey, torch.zeros(2, 1, 16, 16), size=32)
    value.backward()
    assert value > 0 and grey.grad.abs().sum() > 0


def test_lpips_refuses_missing_or_foreign_files(lpips_files, tmp_path):
    state, _ = lpips_files
    with pytest.raises(UsageError, match="no such file"):
        load_lpips(str(tmp_path / "absent.pth"))
    torch.save({k: v for k, v in state.items() if not k.startswith("lin4")}, tmp_path / "partial.pth")
    with pytest.raises(UsageError, match="lacks 1 LPIPS-VGG weights"):
        load_lpips(str(tmp_path / "partial.pth"))
    torch.save({**state, "lin0.model.1.weight": torch.ones(1, 3, 1, 1)}, tmp_path / "shape.pth")
    with pytest.raises(UsageError, match="wrong shape"):
        load_lpips(str(tmp_path / "shape.pth"))
    torch.save({"x": LPIPS}, tmp_path / "code.pth")  # a pickled class: weights_only refuses to load code
    with pytest.raises(UsageError, match="not a tensor file"):
        load_lpips(str(tmp_path / "code.pth"))


def test_cli_says_when_the_lpips_file_is_absent(first_stage, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "core.run", "objective=sfd-1", "teacher=checkpoint",
                           f"teacher.path={first_stage}", f"objective.lpips_path={tmp_path / 'vgg.pth'}", f"out={out}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("fewstep: error:") and "lpips_path" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert not out.exists()


def test_lpips_needs_image_data(first_stage, lpips_files, tmp_path):
    _, root = lpips_files
    tr = Trainer(run_config("objective=sfd-1", "teacher=checkpoint", f"teacher.path={first_stage}",
                            f"objective.lpips_path={root / 'vgg.pth'}", f"out={tmp_path / 'run'}"))
    with pytest.raises(UsageError, match="needs image data"):
        tr.build()


@pytest.fixture(scope="module")
def image_first_stage(tmp_path_factory):
    """A barely trained SFD-v UNet on a barely trained digits teacher (8x8 images, mechanics only)."""
    root = tmp_path_factory.mktemp("image-first-stage")
    quiet = ("train.eval_every=0", "train.preview_every=0", "train.eval_samples=16", "data=digits")
    train("objective=denoise", "student=unet", "student.channels=[8]", "student.attention=[]", "student.head_dim=8",
          "train.steps=2", "train.batch=8", *quiet, f"out={root / 'teacher'}")
    train("objective=sfd-v", "teacher=checkpoint", f"teacher.path={root / 'teacher'}", "student=copy-nfe",
          "train.steps=1", "train.batch=4", *quiet, f"out={root / 'sfdv'}")
    return str(root / "sfdv")


def test_lpips_is_added_on_the_last_step_of_an_image_student(image_first_stage, lpips_files, tmp_path):
    """NFE 2 (AFS + 2 calls): step 1's loss is L1 alone, step 2's is L1 + lambda * LPIPS at 224 px (each against
    the first stage's Euler + AFS trajectory, written out here), with the LPIPS of the user's file."""
    state, root = lpips_files
    tr = Trainer(run_config("objective=sfd-1", "objective.nfe=2", "teacher=checkpoint", "data=digits",
                            f"teacher.path={image_first_stage}", f"objective.lpips_path={root / 'vgg.safetensors'}",
                            "objective.lpips_weight=0.7", "train.batch=2", f"out={tmp_path / 'run'}"))
    tr.build()
    assert torch.equal(tr.objective.lpips.lins[4].weight, state["lin4.model.1.weight"])
    first, student = tr.teacher.net, tr.student
    cond = tr.teacher.encode_condition(torch.tensor([3, 7]))
    ctx = Context(tr.nets, {"x": None, "cond": cond}, 0, 2, "cpu")
    rng = torch.get_rng_state()
    losses = [value.detach() for value, _ in tr.objective.loss("student", ctx)]
    torch.set_rng_state(rng)
    x_T = 80.0 * torch.randn(2, 1, 8, 8)
    fine = _grid(10)  # N = 4 student timestamps, M = 2: (M+1)(N-1)+1
    sigma = lambda s: torch.full((2,), s)  # noqa: E731
    with torch.no_grad():
        target = _euler_afs(lambda x, s: first.denoise(x, sigma(s), cond, nfe=8), x_T, fine)[::3]
        out = _euler_afs(lambda x, s: student.denoise(x, sigma(s), cond, nfe=2), x_T, fine[::3])
        up = lambda z: F.interpolate(z.expand(-1, 3, -1, -1), size=(224, 224), mode="bilinear")  # noqa: E731
        perceptual = _reference_lpips(state, up(out[3]), up(target[3])).mean()
    assert len(losses) == 2 and perceptual > 0
    torch.testing.assert_close(losses[0], (out[2] - target[2]).abs().mean(), rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(losses[1], (out[3] - target[3]).abs().mean() + 0.7 * perceptual, rtol=2e-4, atol=1e-6)


def test_an_absent_lpips_file_is_named_before_anything_runs(first_stage, tmp_path):
    with pytest.raises(UsageError, match="^" + re.escape(
            f"objective: lpips_path={tmp_path / 'vgg.pth'}: no such file; pass the LPIPS-VGG weights "
            "file (docs/methods/sfd.md) or drop objective.lpips_path")):
        run_config("objective=sfd-1", "teacher=checkpoint", f"teacher.path={first_stage}",
                   f"objective.lpips_path={tmp_path / 'vgg.pth'}", f"out={tmp_path / 'run'}")


# -- quality -----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_one_nfe_student_beats_the_teacher_four_step_euler(ring8_teacher_run, tmp_path):
    """ring8: denoise teacher -> SFD-v (defaults) -> sfd-1 (defaults); the 1-NFE student against the teacher
    network's 4-step Euler, both scored against the same exact samples."""
    quiet = ("train.eval_every=0", "train.eval_samples=256")
    train("objective=sfd-v", "teacher=checkpoint", f"teacher.path={ring8_teacher_run}", *quiet, f"out={tmp_path / 'v'}")
    res = train("objective=sfd-1", "teacher=checkpoint", f"teacher.path={tmp_path / 'v'}", *quiet,
                f"out={tmp_path / 'one'}")
    teacher = res["trainer"].teacher.source  # the ring8 network teacher
    networks, spec, _ = load_run(str(tmp_path / "one"))
    torch.manual_seed(123)
    n = 3000
    ref = teacher.sample_exact(n)
    assert len(spec.times) == 3  # AFS + one network call
    student = energy_distance(generate(networks.student, spec, n, shape=(2,)), ref)
    euler4 = energy_distance(generate(teacher, SamplingSpec("euler", make_grid(teacher.schedule, 4).tolist(), {}),
                                      n, shape=(2,)), ref)
    assert student <= euler4, (student, euler4)


# -- the first-stage teacher's checks and its denoiser ----------------------------------------------------------

class _RunTeacher:
    """A teacher loaded from a run (``run_config.objective``), recording its denoise calls."""

    schedule = "edm"

    def __init__(self, objective=None, nfe=None):
        if objective is not None:
            config = type("C", (), {"nfe": nfe})()
            self.run_config = type("R", (), {"objective": type("O", (), {"name": objective, "config": config})()})()
        self.calls = []

    def denoise(self, *args):
        self.calls.append(args)
        return args[0]


@pytest.mark.parametrize("objective,nfe,expected", [
    ("denoise", None, "fewstep: warning: objective=sfd-1 distils a first-stage SFD or SFD-v run; teacher.path holds "
                      "a denoise teacher, which runs its plain Euler steps as the target\n"),
    (None, None, "fewstep: warning: objective=sfd-1 distils a first-stage SFD or SFD-v run; teacher.path holds a "
                 "non-run teacher, which runs its plain Euler steps as the target\n"),
    ("sfd", 3, "fewstep: warning: the first-stage SFD run was trained for NFE 3; the second stage runs it at NFE 5 "
               "(train it with objective.nfe=5, or use sfd-v)\n"),
    ("sfd", 5, ""), ("sfd-v", 2, "")])
def test_first_stage_says_what_the_teacher_is_not(capsys, objective, nfe, expected):
    from plugins.sfd import FirstStage

    FirstStage(_RunTeacher(objective, nfe), nfe=5)
    assert capsys.readouterr().err == expected


def test_first_stage_passes_guidance_to_an_unconditioned_teacher():
    from plugins.sfd import FirstStage

    teacher = _RunTeacher("sfd", 5)
    x, t, cond = torch.randn(2, 2), torch.ones(2), torch.zeros(2, dtype=torch.long)
    assert FirstStage(teacher, nfe=5).denoise(x, t, cond, 2.5) is x
    assert len(teacher.calls) == 1 and teacher.calls[0][2] is cond and teacher.calls[0][3] == 2.5
