"""Tiny diffusers pipelines of the real architectures (SD1.5, SDXL, SD3), built from configs with random
weights and a character-level CLIP tokenizer written here, then saved with ``save_pretrained`` so tests
load them back through the real ``from_pretrained`` path. No hub access. Shared by tests and benchmarks.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

SEQ = 16  # tokenizer model_max_length: short prompts keep CPU tests fast
# prompt/latent caches and converted single files go to a fresh folder, never the user's ~/.cache (CLI
# subprocesses inherit it)
os.environ.setdefault("FEWSTEP_CACHE", tempfile.mkdtemp(prefix="fewstep-cache-"))


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's byte -> printable-unicode table (the alphabet of a byte-level BPE vocab)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tokenizer():
    """A character-level CLIPTokenizer: every byte char and its end-of-word form, no merges, so distinct prompts
    give distinct token ids (tests of conditioning and guidance depend on that)."""
    import inspect

    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    if "vocab" in inspect.signature(CLIPTokenizer.__init__).parameters:  # transformers >= 5 takes them in memory
        # (given file paths it silently keeps only the special tokens, and every prompt encodes the same)
        return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=SEQ)
    path = tempfile.mkdtemp(prefix="fewstep-tok-")
    vocab_file, merges_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    with open(vocab_file, "w") as f:
        json.dump(vocab, f)
    with open(merges_file, "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(vocab_file=vocab_file, merges_file=merges_file, model_max_length=SEQ)


def clip(hidden: int = 32, projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=37, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=SEQ, projection_dim=hidden,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def vae(latent_channels: int = 4, scaling: float = 0.18215, shift: float | None = None, seed: int = 0):
    """Two blocks: one 2x downsampling, so 16 px images <-> 8x8 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    extra = {} if shift is None else {"shift_factor": shift}
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, layers_per_block=1, sample_size=16, scaling_factor=scaling,
                         **extra).eval()


def _unet(cross_dim: int, sdxl: bool, seed: int = 0, pooled: int = 32):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=8 * 6 + pooled, transformer_layers_per_block=(1, 2)) if sdxl else {}
    return UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_dim,
                                attention_head_dim=(2, 4), norm_num_groups=8, **extra).eval()


def _ddpm_scheduler(cls_name: str, prediction: str):
    import diffusers

    cls = getattr(diffusers, cls_name)
    extra = {"skip_prk_steps": True} if cls_name == "PNDMScheduler" else {}  # as SD1.5 ships it
    return cls(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               prediction_type=prediction, steps_offset=1, **extra)


def build_sd15(path: str, prediction: str = "epsilon", scheduler: str = "PNDMScheduler") -> str:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae(), text_encoder=clip(), tokenizer=tokenizer(),
                                   unet=_unet(32, sdxl=False), scheduler=_ddpm_scheduler(scheduler, prediction),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def build_sdxl(path: str, prediction: str = "epsilon", scheduler: str = "EulerDiscreteScheduler") -> str:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(vae=vae(scaling=0.13025), text_encoder=clip(seed=1),
                                     text_encoder_2=clip(hidden=48, projection=True, seed=2),
                                     tokenizer=tokenizer(),
                                     tokenizer_2=tokenizer(),
                                     unet=_unet(32 + 48, sdxl=True, pooled=48),
                                     scheduler=_ddpm_scheduler(scheduler, prediction))
    pipe.save_pretrained(path)
    return path


def build_sd3(path: str, shift: float = 3.0) -> str:
    """SD3 without its T5 encoder (diffusers then feeds zeros for the T5 tokens, as SD3 allows); load it with
    ``from_pretrained(path, text_encoder_3=None, tokenizer_3=None)``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(3)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                                    vae=vae(scaling=1.5305, shift=0.0609), text_encoder=clip(projection=True, seed=4),
                                    tokenizer=tokenizer(),
                                    text_encoder_2=clip(projection=True, seed=5),
                                    tokenizer_2=tokenizer(),
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(path)
    return path


# -- the original (CompVis/LDM) single-file layout, for from_single_file tests ------------------------
def _ldm_unet_key(key: str, layers: int, attn_up: set[int]) -> str:
    """diffusers UNet key -> LDM ``model.diffusion_model.*`` key (the inverse of diffusers' conversion)."""
    import re

    resnet = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
              ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    stem, leaf = key.rsplit(".", 1)
    if stem in fixed:
        return f"{fixed[stem]}.{leaf}"
    rules = [  # (pattern, replacement from the match, whether the rest is a resnet)
        (r"down_blocks\.(\d+)\.resnets\.(\d+)", lambda b, j: f"input_blocks.{b * (layers + 1) + j + 1}.0", True),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)", lambda b, j: f"input_blocks.{b * (layers + 1) + j + 1}.1", False),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv", lambda b: f"input_blocks.{(b + 1) * (layers + 1)}.0.op", False),
        (r"mid_block\.resnets\.(\d+)", lambda j: f"middle_block.{2 * j}", True),
        (r"mid_block\.attentions\.0", lambda: "middle_block.1", False),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)", lambda b, j: f"output_blocks.{b * (layers + 1) + j}.0", True),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)", lambda b, j: f"output_blocks.{b * (layers + 1) + j}.1", False),
        (r"up_blocks\.(\d+)\.upsamplers\.0",  # after the block's last resnet (and attention, where it has one)
         lambda b: f"output_blocks.{b * (layers + 1) + layers}.{2 if b in attn_up else 1}", False),
    ]
    for pattern, make, is_resnet in rules:
        m = re.match(pattern + r"\.(.*)", key)
        if m:
            *nums, rest = m.groups()
            if is_resnet:
                for new, old in resnet:
                    rest = rest.replace(new, old)
            return f"{make(*map(int, nums))}.{rest}"
    raise KeyError(key)


def _ldm_vae_key(key: str, blocks: int) -> str:
    import re

    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets", r"encoder.down.\1.block", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)",
                 lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}", key)
    key = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", key)
    for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        key = key.replace(f"mid_block.attentions.0.{new}.", f"mid.attn_1.{old}.")
    return key


def _open_clip_state(text_model) -> dict:
    """A transformers CLIPTextModelWithProjection in OpenCLIP's layout (SDXL's second encoder): fused q/k/v
    ``in_proj``, ``resblocks``/``ln_*``/``c_fc``/``c_proj`` names, ``text_projection`` as a [hidden, proj] matrix."""
    import re

    state, out = text_model.state_dict(), {}
    for k, v in state.items():
        k = k.removeprefix("text_model.")
        m = re.match(r"encoder\.layers\.(\d+)\.(.*)", k)
        if k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
        elif k == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif k == "embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif k.startswith("final_layer_norm."):
            out["ln_final." + k.split(".")[-1]] = v
        elif m:
            rest = m[2]
            head = f"transformer.resblocks.{m[1]}."
            q = re.match(r"self_attn\.(q|k|v)_proj\.(weight|bias)", rest)
            if q:
                if q[1] == "q":
                    parts = [state[f"text_model.encoder.layers.{m[1]}.self_attn.{p}_proj.{q[2]}"] for p in "qkv"]
                    out[f"{head}attn.in_proj_{q[2]}"] = torch.cat(parts)
                continue
            for new, old in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                             ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")):
                rest = rest.replace(new, old)
            out[head + rest] = v
    return out


def save_single_file(folder: str, path: str) -> str:
    """The SD1.5 or SDXL pipeline in ``folder`` as one ``.safetensors`` file in the original LDM key layout, as
    fine-tunes ship: UNet under model.diffusion_model., VAE under first_stage_model. (1x1-conv attention), CLIP
    under cond_stage_model.transformer. (SD1.5) or conditioner.embedders.0.transformer. and, in OpenCLIP's
    layout, conditioner.embedders.1.model. (SDXL)."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    pipe = DiffusionPipeline.from_pretrained(folder)
    layers, unet = pipe.unet.config.layers_per_block, pipe.unet.state_dict()
    attn_up = {int(k.split(".")[1]) for k in unet if k.startswith("up_blocks.") and ".attentions." in k}
    out = {f"model.diffusion_model.{_ldm_unet_key(k, layers, attn_up)}": v for k, v in unet.items()}
    blocks = len(pipe.vae.config.block_out_channels)
    for k, v in pipe.vae.state_dict().items():
        key = _ldm_vae_key(k, blocks)
        out[f"first_stage_model.{key}"] = v[:, :, None, None] if ".mid.attn_1." in key and v.ndim == 2 else v
    xl = getattr(pipe, "text_encoder_2", None) is not None
    prefix = "conditioner.embedders.0.transformer." if xl else "cond_stage_model.transformer."
    for k, v in pipe.text_encoder.state_dict().items():
        out[prefix + (k if k.startswith("text_model.") else "text_model." + k)] = v
    if xl:
        out.update({f"conditioner.embedders.1.model.{k}": v for k, v in _open_clip_state(pipe.text_encoder_2).items()})
    save_file({k: v.contiguous() for k, v in out.items()}, path)
    return path


BUILDERS = {"sd15": build_sd15, "sdxl": build_sdxl, "sd3": build_sd3}


# -- pytest fixtures (import them into a test module) -------------------------------------------------
try:
    import pytest
except ImportError:  # benchmarks without pytest
    pytest = None

if pytest is not None:
    def _built(kind: str, **kw):
        @pytest.fixture(scope="session")
        def fixture(tmp_path_factory):
            pytest.importorskip("diffusers")
            return BUILDERS[kind](str(tmp_path_factory.mktemp(kind) / "pipe"), **kw)

        return fixture

    sd15_dir = _built("sd15")
    sd15_v_dir = _built("sd15", prediction="v_prediction")
    sdxl_dir = _built("sdxl")
    sd3_dir = _built("sd3")


def exported_images(export_dir, prompts: list[str], seed: int):
    """The images in [0, 1] of an exported pipeline, called as its fewstep_sampling.json says (fewstep's
    scheduler and the recorded call arguments) after ``torch.manual_seed(seed)``, as ``core.sample seed=``
    seeds; returns (images, pipeline)."""
    from diffusers import DiffusionPipeline

    from plugins.diffusers.export import FewstepScheduler

    export_dir = str(export_dir)
    with open(os.path.join(export_dir, "fewstep_sampling.json")) as f:
        exact = json.load(f)["exact"]
    pipe = DiffusionPipeline.from_pretrained(export_dir)
    pipe.scheduler = FewstepScheduler.from_pretrained(export_dir, subfolder=exact["subfolder"])
    torch.manual_seed(seed)
    with torch.no_grad():
        return pipe(list(prompts), output_type="pt", **exact["call_kwargs"]).images, pipe
