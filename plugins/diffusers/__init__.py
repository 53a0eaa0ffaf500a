"""Diffusers teachers (``sdxl``, ``sd15``, ``sd3``/``flow``), ``diffusers`` students and critics (full or
LoRA), datasets ``prompts`` and ``images``, the ``validation`` callback (fixed-prompt preview grids), and export
of the student as a diffusers pipeline.

Registration imports nothing heavy: diffusers, transformers and peft load inside the factories, so
``python -m core.run list`` works without them and a run that needs them says ``pip install
'fewstep[diffusers]'``. See docs/diffusers.md.
"""

from __future__ import annotations

from core import hookimpl
from core.errors import UsageError
from plugins.diffusers.data import Images, ImagesConfig, Prompts, PromptsConfig
from plugins.diffusers.networks import NetConfig
from plugins.diffusers.shared import SharedLoraConfig
from plugins.diffusers.teacher import DiffusersTeacherConfig


def _teacher(family: str, doc: str):
    def make(config: DiffusersTeacherConfig, device="cpu"):
        from plugins.diffusers.loading import require

        for module in ("diffusers", "transformers"):
            require(module)
        from plugins.diffusers.teacher import DiffusersTeacher

        return DiffusersTeacher(config, device, family)

    make.__doc__ = doc
    make.__name__ = f"{family}_teacher"
    make.default_student = "diffusers"
    make.default_data = "prompts"
    return make


def _copy(teacher, config: NetConfig, role: str, device):
    """A trainable fp32 copy of the diffusers teacher's UNet / transformer, LoRA with ``lora_rank > 0``. DMD2 keeps
    its fake score a full copy even with a LoRA generator, which ``critic=fake-score`` (the default) does."""
    from plugins.diffusers.networks import add_lora
    from plugins.diffusers.teacher import DiffusersTeacher

    if not isinstance(teacher, DiffusersTeacher):
        raise UsageError(f"{role}=diffusers needs a diffusers teacher (sdxl, sd15, sd3, flow); "
                         f"got {type(teacher).__name__}")
    net = teacher.trainable_copy()
    if config.lora_rank > 0:
        add_lora(net, config)
    return net.to(device)


def _student(config, teacher, device="cpu"):
    """Trainable copy of a diffusers teacher's UNet/transformer (LoRA with student.lora_rank > 0)."""
    return _copy(teacher, config, "student", device)


def _critic(config, teacher, student, device="cpu"):
    """Fake score from a diffusers teacher's network (LoRA with critic.lora_rank > 0)."""
    return _copy(teacher, config, "critic", device)


def _shared_student(config, teacher, device="cpu"):
    """LoRA adapter on the teacher's own frozen UNet: teacher, student and critic share one base (DMD2 on one GPU)"""
    from plugins.diffusers.shared import shared_student

    return shared_student(config, teacher, device)


def _shared_critic(config, teacher, student, device="cpu"):
    """Fake score as a second LoRA adapter on the teacher's UNet (with student=shared-lora)"""
    from plugins.diffusers.shared import shared_critic

    return shared_critic(config, teacher, student, device)


@hookimpl
def register_teachers(register):
    register("sdxl", _teacher("sdxl", "Stable Diffusion XL pipeline (teacher.path=FOLDER|FILE.safetensors|URL|HUB_ID), eps or v"),
             config=DiffusersTeacherConfig)
    register("sd15", _teacher("sd15", "Stable Diffusion 1.x/2.x pipeline (teacher.path=...), eps or v"),
             config=DiffusersTeacherConfig)
    register("sd3", _teacher("sd3", "Stable Diffusion 3 flow-matching pipeline (teacher.path=...)"),
             config=DiffusersTeacherConfig)
    register("flow", _teacher("flow", "Flow-matching diffusers pipeline, SD3-style (velocity prediction)"),
             config=DiffusersTeacherConfig)


@hookimpl
def register_students(register):
    register("diffusers", _student, config=NetConfig)
    register("shared-lora", _shared_student, config=SharedLoraConfig)


@hookimpl
def register_critics(register):
    register("diffusers", _critic, config=NetConfig)
    register("shared-lora", _shared_critic, config=SharedLoraConfig)


@hookimpl
def register_datasets(register):
    register("prompts", Prompts, config=PromptsConfig)
    register("images", Images, config=ImagesConfig)


@hookimpl
def register_callbacks(register):
    from plugins.diffusers.validation import ValidationGrids

    register("validation", ValidationGrids)
