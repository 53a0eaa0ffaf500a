"""Student ``unet``: a pixel-space UNet (``diffusers.UNet2DModel``) with EDM preconditioning, for image data.

The backbone F(c_in x, c_noise, label) is diffusers' UNet2DModel with a class embedding of
``num_classes + 1`` rows: the extra row is the null label (-1) that ``objective=denoise`` drops labels to,
so the trained network supports classifier-free guidance. ``core.networks.DenoiserNet`` wraps it into
D(x_t, t) = c_skip x_t + c_out F(c_in x_t, c_noise) (Karras et al. 2022, Table 1) on the teacher's
schedule; c_noise = -logSNR/8 (EDM's ln(sigma)/4) goes into the UNet's sinusoidal time embedding as EDM
feeds its networks.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor, nn

from core import hookimpl
from core.config import positive
from core.errors import UsageError
from core.networks import DenoiserNet, guided


@attrs.define(kw_only=True)
class UNetConfig:
    channels: list[int] = attrs.field(factory=lambda: [32, 64], metadata={"doc": "channels per resolution level"})
    blocks: int = attrs.field(default=1, validator=positive, metadata={"doc": "residual blocks per level"})
    attention: list[int] = attrs.field(factory=lambda: [4], metadata={"doc": "resolutions (pixels) with self-attention"})
    head_dim: int = attrs.field(default=16, validator=positive, metadata={"doc": "attention head size"})
    sigma_data: float | None = attrs.field(default=None, validator=positive,
                                           metadata={"doc": "data std for preconditioning (default: the teacher's)"})

    def __attrs_post_init__(self):
        if not self.channels or any(c <= 0 or c % 8 for c in self.channels):
            raise ValueError(f"channels must be positive multiples of 8 (GroupNorm groups), got {self.channels}")


class UNetBackbone(nn.Module):
    """F(x, c_noise, label) on ``diffusers.UNet2DModel``; label -1 (or no label) is the null class."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int, config: UNetConfig):
        super().__init__()
        from diffusers import UNet2DModel

        c, h, w = shape
        levels = len(config.channels)
        if h % 2 ** (levels - 1) or w % 2 ** (levels - 1):
            raise UsageError(f"student=unet: {levels} levels halve the image {levels - 1} times; "
                             f"{h}x{w} does not divide (use fewer student.channels)")
        res = [h // 2**i for i in range(levels)]
        attn = set(config.attention)
        self.num_classes = num_classes
        self.unet = UNet2DModel(
            sample_size=(h, w), in_channels=c, out_channels=c,
            block_out_channels=tuple(config.channels), layers_per_block=config.blocks,
            down_block_types=tuple("AttnDownBlock2D" if r in attn else "DownBlock2D" for r in res),
            up_block_types=tuple("AttnUpBlock2D" if r in attn else "UpBlock2D" for r in reversed(res)),
            norm_num_groups=8, attention_head_dim=config.head_dim,
            num_class_embeds=num_classes + 1 if num_classes else None)

    @property
    def emb_width(self) -> int:
        """Size of the time embedding that ``extra_emb`` is added to (SFD-v's NFE conditioning)."""
        return self.unet.time_embedding.linear_2.out_features

    def forward(self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None,
                extra_emb: Tensor | None = None) -> Tensor:
        labels = None
        if self.num_classes:
            labels = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device) if cond is None \
                else torch.as_tensor(cond, device=x.device).long()
            labels = torch.where(labels < 0, self.num_classes, labels)
        if extra_emb is None:
            return self.unet(x, c_noise, class_labels=labels).sample
        # UNet2DModel has no input for it: add it to the time embedding's output for this call only
        handle = self.unet.time_embedding.register_forward_hook(lambda mod, args, out: out + extra_emb.to(out.dtype))
        try:
            return self.unet(x, c_noise, class_labels=labels).sample
        finally:
            handle.remove()


class UNetDenoiser(DenoiserNet):
    """EDM-preconditioned UNet; CFG through the null label; names its bottleneck for DMD2's GAN head."""

    gan_feature_module = "backbone.unet.mid_block"

    def denoise(self, x_t: Tensor, t: Tensor, cond=None, guidance: float | None = None, **kwargs) -> Tensor:
        if guidance is None or guidance == 1 or cond is None:
            return super().denoise(x_t, t, cond, **kwargs)
        if kwargs:
            raise UsageError(f"student=unet: guidance does not combine with {', '.join(kwargs)}")
        return guided(self, x_t, torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0]), cond, guidance)


def unet_student(config: UNetConfig, teacher, device="cpu"):
    """Pixel UNet (diffusers UNet2DModel, class embeddings for CFG) with EDM preconditioning, for images."""
    shape = tuple(teacher.data_shape)
    if len(shape) != 3:
        raise UsageError(f"student=unet is for image data (C, H, W); the teacher's data has shape {shape} "
                         "(use student=mlp, or data=digits)")
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise UsageError("student=unet needs diffusers; install it with: pip install 'fewstep[diffusers]'") from None
    backbone = UNetBackbone(shape, getattr(teacher, "num_classes", 0), config)
    sigma_data = config.sigma_data or getattr(teacher, "sigma_data", 0.5)
    return UNetDenoiser(backbone, teacher.schedule, "edm", sigma_data).to(device)


unet_student.conformance_config = {"teacher": "digits", "data": "digits", "student.channels": "[8,16]"}


@hookimpl
def register_students(register):
    register("unet", unet_student, config=UNetConfig)
