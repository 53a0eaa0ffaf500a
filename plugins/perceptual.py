"""LPIPS (Zhang et al., CVPR 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"),
VGG-16 variant, for SFD's second stage: weights come only from a file the user names, never a download.

d(x, y) = sum_l mean_hw || w_l * (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|) ||^2, with f_l the VGG-16 activations
after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 of the inputs shifted and scaled channel-wise (the
ScalingLayer), |.| the channel norm, and w_l >= 0 the learned per-channel weights (the 1x1 "lin" layers).

The file is the state dict of the ``lpips`` package's ``LPIPS(net="vgg")`` (backbone and lin layers), in
safetensors or a plain ``torch.save`` of tensors (loaded with ``weights_only=True``: nothing is unpickled).
"""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from torch import nn

from core import files
from core.errors import UsageError

VGG_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))  # out channels per conv
SHIFT = (-0.030, -0.088, -0.188)  # the ScalingLayer's constants (inputs in [-1, 1])
SCALE = (0.458, 0.448, 0.450)
FIX = "pass objective.lpips_path=FILE with the state dict of lpips.LPIPS(net='vgg') (see docs/methods/sfd.md)"


class LPIPS(nn.Module):
    """VGG-16 LPIPS on images in [-1, 1]; ``forward(x, y)`` is one distance per sample, shape [B]."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.blocks, c_in = nn.ModuleList(), 3
        for widths in VGG_BLOCKS:
            convs = nn.ModuleList()
            for w in widths:
                convs.append(nn.Conv2d(c_in, w, 3, padding=1))
                c_in = w
            self.blocks.append(convs)
        self.lins = nn.ModuleList(nn.Conv2d(w[-1], 1, 1, bias=False) for w in VGG_BLOCKS)
        self.requires_grad_(False).eval()

    def features(self, x):
        h, out = (x - self.shift) / self.scale, []
        for b, convs in enumerate(self.blocks):
            if b:
                h = F.max_pool2d(h, 2)
            for conv in convs:
                h = F.relu(conv(h))
            out.append(h / (h.square().sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x, y):
        pairs = zip(self.lins, self.features(x), self.features(y))
        return sum(lin((a - b).square()).mean((1, 2, 3)) for lin, a, b in pairs)

    # -- the lpips package's key layout: net.sliceK.<index in torchvision's vgg16.features>, linK.model.1 --
    def package_keys(self):
        """{our key: the lpips package's key} for every weight."""
        keys, index = {}, 0
        for b, convs in enumerate(self.blocks):
            index += int(b > 0)  # the max-pool opening each slice after the first
            for c in range(len(convs)):
                for p in ("weight", "bias"):
                    keys[f"blocks.{b}.{c}.{p}"] = f"net.slice{b + 1}.{index}.{p}"
                index += 2  # conv, relu
            keys[f"lins.{b}.weight"] = f"lin{b}.model.1.weight"
        return keys


def load_lpips(path: str, device="cpu") -> LPIPS:
    """LPIPS with the weights in ``path``; a one-line UsageError when the file is absent or not LPIPS-VGG."""
    if not files.exists(path):
        raise UsageError(f"objective.lpips_path={path}: no such file; {FIX}")
    if path.endswith(".safetensors"):
        state = files.load_tensors(path, fix=FIX)
    else:
        try:
            state = torch.load(io.BytesIO(files.read_bytes(path, fix=FIX)), map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses anything but tensors and plain containers
            raise UsageError(f"objective.lpips_path={path}: not a tensor file ({type(exc).__name__}); {FIX}") from None
    model = LPIPS()
    keys = model.package_keys()
    missing = [theirs for theirs in keys.values() if theirs not in state]
    if missing:
        raise UsageError(f"objective.lpips_path={path}: lacks {len(missing)} LPIPS-VGG weights "
                         f"(e.g. {missing[0]}); {FIX}")
    try:
        model.load_state_dict({ours: state[theirs] for ours, theirs in keys.items()}
                              | {"shift": model.shift, "scale": model.scale})
    except RuntimeError as exc:
        detail = str(exc).splitlines()[-1].strip()
        raise UsageError(f"objective.lpips_path={path}: weights of the wrong shape ({detail}); {FIX}") from None
    return model.to(device)


def lpips_term(model: LPIPS, x, y, size: int = 224):
    """Mean LPIPS of images in [-1, 1] after bilinear upsampling to ``size`` (SFD's second stage);
    one-channel images are repeated to three."""
    if x.shape[1] == 1:
        x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
    up = lambda z: F.interpolate(z, size=(size, size), mode="bilinear", align_corners=False)  # noqa: E731
    return model(up(x), up(y)).mean()
