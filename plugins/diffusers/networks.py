"""Student ``diffusers`` and critic ``diffusers``: trainable copies of the teacher's UNet / transformer,
full fine-tune or LoRA (``student.lora_rank=64``). DMD2 keeps its fake score a full copy even with a LoRA
generator, which ``critic=fake-score`` (the default) already does."""

from __future__ import annotations

from core.errors import UsageError
from plugins.diffusers.lora import NetConfig, add_lora


def _copy(teacher, config: NetConfig, role: str, device):
    from plugins.diffusers.teacher import DiffusersTeacher

    if not isinstance(teacher, DiffusersTeacher):
        raise UsageError(f"{role}=diffusers needs a diffusers teacher (sdxl, sd15, sd3, flow); "
                         f"got {type(teacher).__name__}")
    net = teacher.trainable_copy()
    if config.lora_rank > 0:
        add_lora(net, config)
    return net.to(device)


def diffusers_student(config: NetConfig, teacher, device="cpu"):
    """Trainable copy of the diffusers teacher's network (LoRA with student.lora_rank > 0)."""
    return _copy(teacher, config, "student", device)


def diffusers_critic(config: NetConfig, teacher, student, device="cpu"):
    """Fake-score critic from the diffusers teacher's network (LoRA with critic.lora_rank > 0)."""
    return _copy(teacher, config, "critic", device)
