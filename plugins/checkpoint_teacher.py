"""Teacher ``checkpoint``: serves the network trained by an earlier run (e.g. ``objective=denoise``)."""

from __future__ import annotations

import copy

import attrs
import torch

from core import hookimpl
from core.errors import UsageError
from core.networks import guided
from core.protocols import sigma_data_of


@attrs.define(kw_only=True)
class CheckpointTeacherConfig:
    path: str = attrs.field(default="", metadata={"doc": "run dir (local or fsspec URL) of a finished run"})
    guidance: float = attrs.field(default=1.0, metadata={"doc": "default CFG scale"})

    def __attrs_post_init__(self):
        if not self.path:
            raise ValueError("teacher=checkpoint needs teacher.path=RUN_DIR (the out= of a denoise run)")


class CheckpointTeacher:
    """The student network of a finished run, frozen, served as a teacher (CFG via null label -1)."""

    def __init__(self, config: CheckpointTeacherConfig, device="cpu"):
        from core.rundir import load_run

        networks, _, run_cfg = load_run(config.path, device=device)
        self.source = networks.teacher
        self.net = networks.student.requires_grad_(False).eval()
        self.schedule = self.net.schedule
        self.data_shape = tuple(self.source.data_shape)
        self.num_classes = getattr(self.source, "num_classes", 0)
        self.sigma_data = sigma_data_of(self.net)
        self.gan_feature_module = getattr(self.net, "gan_feature_module", None)  # e.g. a UNet's bottleneck
        if hasattr(self.source, "preview_samples"):
            self.preview_samples = self.source.preview_samples
        self.guidance = config.guidance
        self.run_config = run_cfg
        self.device = torch.device(device)
        # exact data access when the source run's teacher has it (metrics against the true mixture)
        for name in ("sample_exact", "assign_modes", "weights", "class_weights"):
            if hasattr(self.source, name):
                setattr(self, name, getattr(self.source, name))

    @torch.no_grad()
    def denoise(self, x_t, t, cond=None, guidance=None):
        return guided(self.net, x_t, torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0]), cond, guidance)

    def encode_condition(self, raw):
        return self.source.encode_condition(raw)

    def to_model_space(self, x):
        return x

    def to_data_space(self, z):
        return self.source.to_data_space(z)  # e.g. the digits pixel range

    def trainable_copy(self):
        return copy.deepcopy(self.net).requires_grad_(True).train()


def _make(config, device="cpu"):
    """The network of a finished run (teacher.path=RUN_DIR), e.g. from objective=denoise."""
    try:
        return CheckpointTeacher(config, device)
    except FileNotFoundError as exc:
        raise UsageError(f"teacher.path={config.path}: {exc}") from None


@hookimpl
def register_teachers(register):
    register("checkpoint", _make, config=CheckpointTeacherConfig, default_student="copy",
             default_data="teacher-samples")


@hookimpl
def register_datasets(register):
    register("teacher-samples", TeacherSamples, config=TeacherSamplesConfig)


@attrs.define(kw_only=True)
class TeacherSamplesConfig:
    pass


class TeacherSamples:
    """Exact data of the checkpoint's source teacher (when it has exact samples)."""

    def __init__(self, config, teacher):
        source_data = getattr(getattr(getattr(teacher, "run_config", None), "data", None), "name", None)
        if not hasattr(teacher, "sample_exact") and source_data not in (None, "teacher-samples"):
            raise UsageError(f"teacher.path's run was trained on data={source_data}; pass data={source_data} "
                             "(data=teacher-samples needs a teacher with exact samples)")
        if not hasattr(teacher, "sample_exact"):
            raise UsageError("data=teacher-samples needs a teacher with exact samples (gmm, or a checkpoint of a gmm run)")
        self.teacher = teacher

    def sample(self, n):
        labels = None
        if getattr(self.teacher, "num_classes", 0):
            labels = torch.randint(0, self.teacher.num_classes, (n,))
        return {"x": self.teacher.sample_exact(n, labels), "cond": labels}

