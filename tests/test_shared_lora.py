"""``student=shared-lora critic=shared-lora``: DMD2 with teacher, student and fake score as one frozen UNet and two
peft adapters, on a tiny SDXL pipeline: the teacher role is bit-identical to a separately loaded teacher, each
phase's gradients reach only its adapter, a run trains, exports (merged UNet and LoRA) what ``core.sample``
samples, resumes exactly, and the planner plans it from the same overrides."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from tiny_pipelines import exported_images, sdxl_dir  # noqa: E402,F401  (fixture)
from test_diffusers_e2e import FAST, cli, images, prompts  # noqa: E402,F401  (helpers and fixtures)

from conftest import run_config, train  # noqa: E402

SHARED = ["objective=dmd2", "teacher=sdxl", "student=shared-lora", "critic=shared-lora", "student.lora_rank=4",
          "critic.lora_rank=4", "objective.lr=0.01", "objective.critic_updates=1"]


def shared_run(sdxl_dir, prompts, out, *extra, plugins=()):
    from core.runner import Trainer

    trainer = Trainer(run_config(*SHARED, f"teacher.path={sdxl_dir}", "data=prompts", f"data.path={prompts}",
                                 f"out={out}", *FAST, *extra), plugins=plugins)
    result = trainer.train()
    result["trainer"] = trainer
    return result


def perturb(params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_teacher_role_is_bit_identical_to_a_separately_loaded_teacher(sdxl_dir):
    from core.registry import get_registry
    from plugins.diffusers.shared import SharedLoraConfig
    from plugins.diffusers.teacher import DiffusersTeacher, DiffusersTeacherConfig

    reg = get_registry()
    config = DiffusersTeacherConfig(path=sdxl_dir)
    separate, teacher = DiffusersTeacher(config, "cpu", "sdxl"), DiffusersTeacher(config, "cpu", "sdxl")
    lora = SharedLoraConfig(lora_rank=4, lora_alpha=4)
    student = reg.get("student", "shared-lora").factory(lora, teacher)
    critic = reg.get("critic", "shared-lora").factory(lora, teacher, student)
    assert teacher.shared_base.unet is teacher.denoiser.net is student.net is critic.net
    perturb(student.parameters(), 1)
    perturb(critic.parameters(), 2)
    cond = teacher.encode_condition(["a red cube", "a cat"])
    separate.encode_condition(["a red cube", "a cat"])
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, *teacher.data_shape, generator=g), torch.tensor([900.0, 300.0])
    with torch.no_grad():
        x0_student, x0_critic = student.denoise(x, t, cond), critic.denoise(x, t, cond)
        for guidance in (None, 5.0):
            assert torch.equal(teacher.denoise(x, t, cond, guidance), separate.denoise(x, t, cond, guidance))
    ref = separate.denoise(x, t, cond)
    assert (x0_student - ref).abs().max() > 1e-4 and (x0_critic - ref).abs().max() > 1e-4
    assert (x0_student - x0_critic).abs().max() > 1e-4
    # a role's parameters and state dict are its adapter's only: checkpoints never hold the base
    names = [n for n, _ in teacher.shared_base.unet.named_parameters()]
    assert len(list(student.parameters())) == sum(".student." in n for n in names) > 0
    assert all("/student/" in k for k in student.state_dict())


class GradProbe:
    """Before each optimizer step: which parameters of the shared UNet hold a nonzero gradient."""

    def __init__(self):
        self.seen = []

    from core import hookimpl

    @hookimpl
    def fewstep_before_optimizer_step(self, trainer, phase, optimizer):
        unet = trainer.teacher.shared_base.unet
        reached = {"student": False, "critic": False, "base": False}
        for name, p in unet.named_parameters():
            if p.grad is not None and p.grad.abs().sum() > 0:
                reached["base" if "lora_" not in name else "student" if ".student." in name else "critic"] = True
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.seen.append((phase.name, reached, stepped))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_each_phase_trains_only_its_adapter(sdxl_dir, prompts, tmp_path, checkpointing):
    probe = GradProbe()
    result = shared_run(sdxl_dir, prompts, tmp_path / "run", f"teacher.gradient_checkpointing={checkpointing}",
                        plugins=[probe])
    trainer = result["trainer"]
    shared = trainer.teacher.shared_base
    student_ids = {id(p) for p in shared.adapter_parameters("student")}
    critic_ids = {id(p) for p in shared.adapter_parameters("critic")}
    head_ids = {id(p) for p in trainer.nets["gan_head"].parameters()}  # sized through the critic's gan_tap
    phases = [name for name, _, _ in probe.seen]
    assert phases.count("generator") == 2 and phases.count("critic") == 2
    for name, reached, stepped in probe.seen:
        trained = "student" if name == "generator" else "critic"
        other = "critic" if trained == "student" else "student"
        assert reached[trained] and not reached[other] and not reached["base"], (name, reached)
        assert stepped == (student_ids if trained == "student" else critic_ids | head_ids)


def test_gan_term_reads_the_critic_adapter_and_trains_only_each_phase_s_adapter(sdxl_dir, images, tmp_path):
    """With real images DMD2's GAN term runs: the generator's loss goes through the critic (with grad, to reach
    x) yet only the student adapter gets gradients; the head reads the mid block of critic forwards only."""
    from core.runner import Trainer

    probe = GradProbe()
    trainer = Trainer(run_config(*SHARED, f"teacher.path={sdxl_dir}", "data=images", f"data.path={images}",
                                 "objective.gan=on", f"out={tmp_path / 'run'}", *FAST), plugins=[probe])
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r[k])) for r in records for k in ("generator/gan", "critic/gan"))
    for name, reached, _ in probe.seen:
        trained, other = ("student", "critic") if name == "generator" else ("critic", "student")
        assert reached[trained] and not reached[other] and not reached["base"], (name, reached)
    student, critic = trainer.nets["student"], trainer.nets["critic"]
    seen = []
    handle = critic.gan_tap.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    cond = trainer.teacher.encode_condition(["a red cube"])
    x, t = torch.randn(1, *trainer.teacher.data_shape), torch.tensor([500.0])
    with torch.no_grad():
        student.denoise(x, t, cond)
        trainer.teacher.denoise(x, t, cond)
        assert not seen
        critic.denoise(x, t, cond)
    handle.remove()
    assert len(seen) == 1


def _adapter_grads(sdxl_dir, role: str, checkpointing: bool):
    """The gradient of ``role``'s adapter for one loss through its forward; for the student (a DMD2 generator
    step) the teacher and critic forwards run without grad between the forward and the backward. The student
    is the shared base's home role, so the critic's checkpointed backward runs while the student is active."""
    from core.registry import get_registry
    from plugins.diffusers.shared import SharedLoraConfig
    from plugins.diffusers.teacher import DiffusersTeacher, DiffusersTeacherConfig

    teacher = DiffusersTeacher(DiffusersTeacherConfig(path=sdxl_dir, gradient_checkpointing=checkpointing), "cpu",
                               "sdxl")
    lora = SharedLoraConfig(lora_rank=4, lora_alpha=4)
    reg = get_registry()
    nets = {"student": reg.get("student", "shared-lora").factory(lora, teacher)}
    nets["critic"] = reg.get("critic", "shared-lora").factory(lora, teacher, nets["student"])
    perturb(nets["student"].parameters(), 1)
    perturb(nets["critic"].parameters(), 2)
    teacher.shared_base.unet.train()
    cond = teacher.encode_condition(["a red cube", "a cat"])
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, *teacher.data_shape, generator=g), torch.tensor([900.0, 300.0])
    out = nets[role].denoise(x, t, cond)
    with torch.no_grad():
        other = teacher.denoise(x, t, cond, 5.0) - nets["critic"].denoise(x, t, cond)
    (out * other).sum().backward()
    return [p.grad.clone() for p in nets[role].parameters()]


@pytest.mark.parametrize("role", ["student", "critic"])
def test_checkpointed_backward_reruns_each_block_with_its_own_adapter(sdxl_dir, role):
    """Gradient checkpointing re-runs blocks in the backward, when another role may be active; SharedBase's
    checkpoint function re-runs each with the adapter of its forward, so the gradients equal those without."""
    plain, checkpointed = (_adapter_grads(sdxl_dir, role, c) for c in (False, True))
    assert sum(float(a.abs().sum()) for a in plain) > 0
    err = max(float((a - b).abs().max() / a.abs().max().clamp(min=1e-12)) for a, b in zip(plain, checkpointed))
    assert err < 1e-5


def test_run_exports_merged_unet_and_lora_that_reproduce_core_sample(sdxl_dir, prompts, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "run"
    result = shared_run(sdxl_dir, prompts, out)
    student = result["trainer"].student
    assert (out / "export" / "lora" / "pytorch_lora_weights.safetensors").exists()
    export = DiffusionPipeline.from_pretrained(str(out / "export"))
    base = DiffusionPipeline.from_pretrained(sdxl_dir)
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 500])
    kw = dict(encoder_hidden_states=torch.randn(2, 16, 80), added_cond_kwargs={
        "text_embeds": torch.randn(2, 48), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]]).expand(2, -1)})
    with torch.no_grad():
        teacher = base.unet(x, t, **kw).sample
        merged = export.unet(x, t, **kw).sample
        ours = student.shared("student", x, t, **kw).sample  # the trained adapter on the shared base
        base.load_lora_weights(str(out / "export" / "lora"))
        lora = base.unet(x, t, **kw).sample
    trained = float((merged - teacher).abs().max())
    assert trained > 1e-4  # training moved the student adapter
    assert float((lora - merged).abs().max()) < 1e-3 * trained + 1e-6
    assert float((ours - merged).abs().max()) < 1e-3 * trained + 1e-6
    # `core.sample seed=S` (which rebuilds the shared base and loads the adapter) == the export's pipeline
    npz = tmp_path / "s.npz"
    cli("core.sample", f"run={out}", "prompt=a red cube", "num=2", "seed=5", f"out={npz}", "device=cpu")
    import numpy as np

    samples = torch.from_numpy(np.load(npz)["samples"]) / 2 + 0.5
    theirs, _ = exported_images(out / "export", ["a red cube"] * 2, seed=5)
    assert float((theirs - samples).abs().max()) <= 1e-3


def test_resume_is_bit_identical(sdxl_dir, prompts, tmp_path):
    """Extending a finished 2-step run to 4 steps equals one 4-step run (constant learning rate: a decay
    depends on train.steps). The checkpoint holds the two adapters, their optimizers and the RNG."""
    const = ["train.lr_decay=none", "train.ckpt_every=2"]
    straight = shared_run(sdxl_dir, prompts, tmp_path / "straight", "train.steps=4", *const)
    first = shared_run(sdxl_dir, prompts, tmp_path / "split", "train.steps=2", *const)
    resumed = shared_run(sdxl_dir, prompts, tmp_path / "split", "train.steps=4", *const)
    assert first["start"] == 0 and resumed["start"] == 2
    for role in ("student", "critic"):
        a = straight["trainer"].nets[role].state_dict()
        b = resumed["trainer"].nets[role].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref = first["trainer"].student.state_dict()
    assert any(not torch.equal(ref[k], a) for k, a in straight["trainer"].student.state_dict().items())


def test_planner_plans_the_run_option_as_the_shared_base(sdxl_dir, prompts):
    """``plan`` with the run's own overrides counts one base in the teacher's dtype and two adapters: exactly
    the parameters the run builds."""
    from core.plan_model import make_plan, setting_of
    from core.roles import Networks

    cfg = run_config(*SHARED, f"teacher.path={sdxl_dir}", "teacher.dtype=bf16", "train.device=cpu", "data=prompts",
                     f"data.path={prompts}")
    setting = setting_of(cfg)
    assert setting.shared_base and setting.student_lora == 4
    plan = make_plan(cfg, setting, simulate=False)
    nets = Networks(cfg, device="cpu").nets
    roles = {r.name: r for r in plan.roles}
    for name in ("student", "critic"):
        params = list(nets[name].parameters())
        assert roles[name].numel == roles[name].trainable == sum(p.numel() for p in params)
        assert sum(roles[name].params.values()) == sum(p.numel() * p.element_size() for p in params)
    base = [p for n, p in nets["teacher"].denoiser.net.named_parameters() if "lora_" not in n]
    assert roles["teacher"].params == {"bfloat16": sum(p.numel() * 2 for p in base)}


@pytest.mark.parametrize("extra, message", [
    (["critic=fake-score"], None),
    (["student=diffusers"], "critic=shared-lora shares the student's base"),
    (["critic.lora_rank=8"], "same lora_rank"),
    (["train.ema=0.99"], "train.ema=0"),
    (["teacher.offload=true"], "drop teacher.offload=true"),
])
def test_bad_combinations_say_what_to_do(sdxl_dir, prompts, tmp_path, extra, message):
    args = [*SHARED, f"teacher.path={sdxl_dir}", "data=prompts", f"data.path={prompts}", f"out={tmp_path / 'r'}",
            *FAST, "train.steps=1", *extra]
    if message is None:  # a full critic beside a shared-lora student is allowed (the critic adapter idles)
        from core.runner import Trainer

        args = [a for a in args if not a.startswith("critic.")]
        trainer = Trainer(run_config(*args))
        trainer.train()
        assert type(trainer.nets["critic"]).__name__ == "DiffusersDenoiser"
        return
    proc = cli("core.run", *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()  # refused before the run directory is claimed
