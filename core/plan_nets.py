"""The networks of a run, built for the memory planner (core.plan) from configs only: no weights are read.

Diffusers teachers: every component (UNet or SD3 transformer, text encoders, VAE) from its ``config.json``
(``teacher.path`` a local pipeline folder), or, for ``teacher=sdxl`` without a path, the reference SDXL-base
architecture: ``benchmarks/sdxl_unet.json`` plus the published configs of its two CLIP text encoders and VAE.
Other teachers (``gmm``, ``teacher=checkpoint``): the teacher as its plugin builds it (a closed form holds no
weights), the student and critic from their plugins' factories on fake tensors.

Modules come back on fake tensors (core.memsim), so the same objects are counted and run for activations.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from core.errors import UsageError

DIFFUSERS_TEACHERS = ("sdxl", "sd15", "sd3", "flow")
SDXL_UNET = Path(__file__).resolve().parents[1] / "benchmarks" / "sdxl_unet.json"
# stabilityai/stable-diffusion-xl-base-1.0: text_encoder (CLIP ViT-L/14), text_encoder_2 (OpenCLIP bigG/14), vae
SDXL_TEXT = dict(vocab_size=49408, max_position_embeddings=77, hidden_size=768, intermediate_size=3072,
                 num_hidden_layers=12, num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")
SDXL_TEXT_2 = dict(vocab_size=49408, max_position_embeddings=77, hidden_size=1280, intermediate_size=5120,
                   num_hidden_layers=32, num_attention_heads=20, projection_dim=1280, hidden_act="gelu")
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
                block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.13025)


def on_meta(build, dtype: torch.dtype | None = None) -> nn.Module:
    """``build()`` on the meta device (no memory, no initialisation), cast to ``dtype`` there."""
    with torch.device("meta"):
        module = build()
        return module.to(dtype) if dtype is not None else module


def to_fake(module: nn.Module, fake) -> nn.Module:
    """Meta parameters -> fake CPU tensors of ``fake`` (a FakeTensorMode): shapes kept, nothing allocated."""
    with fake:
        return module.to_empty(device="cpu")


# -- diffusers pipelines ---------------------------------------------------------------------------------

def _diffusers_component(folder: Path, name: str, library: str, cls_name: str):
    if library == "diffusers":
        import diffusers

        cls = getattr(diffusers, cls_name)
        return lambda: cls.from_config(cls.load_config(folder / name))
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder / name)
    return lambda: getattr(transformers, cls_name)(config)


def diffusers_components(teacher_name: str, path: str) -> dict[str, object]:
    """Builders of the pipeline's networks by component name (``unet``/``transformer``, ``text_encoder*``,
    ``vae``) and ``reference``: a sentence naming where the configs came from."""
    from plugins.diffusers.loading import require

    require("diffusers")
    require("transformers")
    if not path:
        if teacher_name != "sdxl":
            raise UsageError(f"plan teacher={teacher_name} needs teacher.path=FOLDER (a local pipeline folder; "
                             "only its config.json files are read)")
        return _sdxl_reference()
    folder = Path(path).expanduser()
    if not (folder / "model_index.json").is_file():
        raise UsageError(f"plan reads configs from a local pipeline folder; teacher.path={path} has no "
                         "model_index.json (download the configs, or use teacher=sdxl without a path for SDXL-base)")
    index = json.loads((folder / "model_index.json").read_text())
    builders = {}
    for name in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        entry = index.get(name)
        if isinstance(entry, list) and entry[0] and (folder / name / "config.json").is_file():
            builders[name] = _diffusers_component(folder, name, *entry)
    return {"reference": f"configs of {folder}", **builders}


def _sdxl_reference() -> dict[str, object]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = {k: v for k, v in json.loads(SDXL_UNET.read_text()).items() if not k.startswith("_")}
    return {"reference": "the SDXL-base architecture (benchmarks/sdxl_unet.json; CLIP-L, OpenCLIP-bigG, VAE configs)",
            "unet": lambda: UNet2DConditionModel(**unet),
            "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**SDXL_TEXT)),
            "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2)),
            "vae": lambda: AutoencoderKL(**SDXL_VAE)}


def add_adapter(net: nn.Module, rank: int, alpha: float, name: str = "default", dtype=torch.float32) -> None:
    """A peft LoRA adapter on DMD2's target modules (plugins.diffusers.networks.TARGETS); only it trains."""
    import peft

    from plugins.diffusers.networks import TARGETS

    kind = "transformer" if hasattr(net.config, "joint_attention_dim") else "unet"
    present = [n for n, _ in net.named_modules()]
    targets = [t for t in TARGETS[kind] if any(n == t or n.endswith("." + t) for n in present)]
    net.add_adapter(peft.LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets),
                    adapter_name=name)
    for n, p in net.named_parameters():
        if "lora_" in n and f".{name}." in n:
            p.data = p.data.to(dtype)
            p.requires_grad_(True)


def denoiser_inputs(net: nn.Module, batch: int, latent: tuple[int, int], text_len: int) -> tuple[tuple, dict]:
    """Arguments of one call of a diffusers UNet / SD3 transformer at ``batch`` x ``latent`` (H, W), with random
    conditioning of the pipeline's shapes."""
    cfg = net.config
    x = torch.randn(batch, cfg.in_channels, *latent)
    t = torch.full((batch,), 500.0)
    if hasattr(cfg, "joint_attention_dim"):  # SD3 MMDiT
        return (), dict(hidden_states=x, timestep=t,
                        encoder_hidden_states=torch.randn(batch, text_len, cfg.joint_attention_dim),
                        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim))
    kwargs = dict(encoder_hidden_states=torch.randn(batch, text_len, cfg.cross_attention_dim))
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled), "time_ids": torch.randn(batch, 6)}
    return (x, t), kwargs


def gan_feature_shape(net: nn.Module, latent: tuple[int, int]) -> tuple[int, ...]:
    """The critic's bottleneck features read by DMD2's GAN head (plugins.diffusers.networks): a UNet's mid block
    output [C, H, W]; an SD3 transformer's middle block tokens as a map [C, H / patch, W / patch]."""
    cfg = net.config
    h, w = latent
    if hasattr(cfg, "joint_attention_dim"):
        return (cfg.num_attention_heads * cfg.attention_head_dim, h // cfg.patch_size, w // cfg.patch_size)
    down = 2 ** (len(cfg.block_out_channels) - 1)
    return (cfg.block_out_channels[-1], h // down, w // down)
