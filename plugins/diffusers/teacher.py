"""Teachers ``sdxl``, ``sd15`` and ``sd3`` / ``flow``: a diffusers pipeline behind the Teacher protocol.

- schedule: ``VPDiscreteSchedule(scheduler.alphas_cumprod)`` (t = diffusers timestep) for SD1.5/SDXL,
  ``FlowSchedule`` (x_t = (1 - t) x0 + t eps) for SD3-style flow matching;
- prediction: the scheduler's ``prediction_type`` (epsilon, v_prediction, or flow velocity);
- guidance: classifier-free guidance on the raw outputs, cond and uncond in one batch (core.ops.guided_x0);
- conditions: prompt ids into a ``PromptBank`` (below); images: VAE latents scaled by
  ``scaling_factor`` (and shifted by ``shift_factor`` where the VAE has one).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Any, Literal

import attrs
import torch
from torch import Tensor

from core.config import positive
from core.errors import UsageError
from core.schedules import FlowSchedule, VPDiscreteSchedule
from plugins.diffusers import data, loading
from plugins.diffusers.loading import dtype_kwarg
from plugins.diffusers.networks import DiffusersDenoiser, set_attention

@attrs.define(kw_only=True)
class DiffusersTeacherConfig:
    path: str = attrs.field(default="", metadata={"doc": "pipeline folder, single-file .safetensors, fsspec URL "
                                                         "of either, or hub id"})
    config_folder: str = attrs.field(default="", metadata={
        "doc": "single-file checkpoints: a diffusers folder of the same architecture whose configs (and missing "
               "parts) to use; nothing is downloaded"})
    variant: str = attrs.field(default="", metadata={"doc": "weight variant to load, e.g. fp16 (model.fp16.safetensors)"})
    resolution: Any = attrs.field(default=None, converter=lambda v: height_width(v, "teacher.resolution"),
                                  metadata={"doc": "image size in pixels: N (square) or [H,W] (default: native)"})
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = attrs.field(
        default="auto", metadata={"doc": "teacher weights; auto: bf16 on CUDA, fp32 on CPU"})
    attention: Literal["sdpa", "xformers"] = attrs.field(
        default="sdpa", metadata={"doc": "attention backend (xformers needs CUDA and the xformers package)"})
    gradient_checkpointing: bool = attrs.field(default=False,
                                               metadata={"doc": "on the trainable copies (student, critic)"})
    guidance: float | None = attrs.field(
        default=None, metadata={"doc": "teacher CFG scale (DMD2's real score, teacher sampling); "
                                       "default: DMD2's 8 for SDXL, 1.75 for SD1.5; 7 for SD3"})
    max_sequence_length: int = attrs.field(default=256, validator=positive,
                                           metadata={"doc": "SD3: T5 tokens per prompt (pass the same to the pipeline)"})
    export: bool = attrs.field(default=True, metadata={"doc": "write RUN/export as a diffusers pipeline at the end"})
    export_dtype: Literal["fp32", "fp16", "bf16"] = attrs.field(default="fp32",
                                                                metadata={"doc": "dtype of the exported UNet"})
    cache_dir: str = attrs.field(default="", metadata={"doc": "where fsspec URLs are copied and single files converted "
                                                              "(default $FEWSTEP_CACHE/teachers)"})
    embedding_cache: str = attrs.field(default="", metadata={
        "doc": "prompt-embedding cache folder or fsspec URL, reused by runs with the same text encoders "
               "(default $FEWSTEP_CACHE/prompts; 'none': in memory only)"})
    prompt_cache_items: int = attrs.field(default=1024, validator=positive, metadata={
        "doc": "prompt embeddings kept in memory (the rest are read from the disk cache when drawn)"})
    offload: bool = attrs.field(default=False, metadata={  # issue 15 (docs/memory.md), "shared" helper
        "doc": "keep the teacher's UNet/transformer on the CPU and move it to the device for each of its forwards "
               "(frees its GPU memory between them, at a host-to-device copy per teacher call)"})
    encoders_on_device: bool = attrs.field(default=True, metadata={  # issue 15 (docs/memory.md), "shared" helper
        "doc": "false: the text encoders and the VAE stay on the CPU and encode/decode there (prompt embeddings "
               "and latents are cached on disk once), freeing their GPU memory for training"})


def height_width(value, name: str) -> tuple[int, int] | None:
    """N -> (N, N); [H, W] or "H,W" -> (H, W); None stays None (the model's native size)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(value, str):
        value = [v for v in value.strip("[]() ").split(",") if v.strip()]
    items = list(value) if isinstance(value, (list, tuple)) else [value, value]
    if len(items) == 1:  # "32" from the command line, or [32]
        items = items * 2
    try:
        hw = tuple(int(v) for v in items)
        ok = len(hw) == 2 and all(float(v) == int(v) for v in items)
    except (TypeError, ValueError):
        ok = False
    if not ok or min(hw) <= 0:
        raise ValueError(f"{name} takes a positive size N or [H,W], got {value!r}")
    return hw


FAMILIES = {"sd15": "Stable Diffusion 1.x/2.x (UNet, one CLIP encoder)",
            "sdxl": "Stable Diffusion XL (UNet, two CLIP encoders, pooled + time ids)",
            "sd3": "Stable Diffusion 3 (MMDiT transformer, flow matching)"}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}
DEFAULT_GUIDANCE = {"sdxl": 8.0, "sd15": 1.75, "sd3": 7.0}  # DMD2's real-score scales; SD3's pipeline default
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def detect_family(pipe) -> str:
    if getattr(pipe, "transformer", None) is not None and hasattr(pipe.transformer.config, "joint_attention_dim"):
        return "sd3"
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise UsageError(f"{type(pipe).__name__} is neither a UNet (SD1.5/SDXL) nor an SD3 transformer pipeline")
    return "sdxl" if unet.config.get("addition_embed_type") == "text_time" else "sd15"


class DiffusersTeacher:
    """A frozen diffusers pipeline as a fewstep teacher (see module docstring)."""

    num_classes = 0
    sigma_data = 0.5
    expensive_calls = True  # a large pipeline: objectives keep optional extra teacher calls off by default
    # moment matching draws z_t from real images (Alg. 2) and has no data-free mode; data=prompts has no images
    real_data_hint = ("data=images data.path=FOLDER (images with same-name .txt captions); data=prompts holds text "
                      "only")

    def __init__(self, config: DiffusersTeacherConfig, device="cpu", family: str | None = None):
        self.config, self.device = config, torch.device(device)
        dtype = DTYPES.get(config.dtype) or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.weight_dtype = dtype
        self.folder, self.pipe = loading.load_teacher(config, family, dtype)
        self.family = detect_family(self.pipe)
        if family is not None and family != self.family and not (family == "flow" and self.family == "sd3"):
            raise UsageError(f"teacher.path={config.path} holds a {self.family} pipeline ({type(self.pipe).__name__}); "
                             f"use teacher={self.family}")
        self.pipe.set_progress_bar_config(disable=True)
        self.net_name = "transformer" if self.family == "sd3" else "unet"
        sched_cfg = self.pipe.scheduler.config
        self.scheduler_config = dict(sched_cfg)
        if self.family == "sd3":
            self.schedule, self.prediction = FlowSchedule(), "flow"
            time_scale = float(sched_cfg.get("num_train_timesteps", 1000))
        else:
            ac = self.pipe.scheduler.alphas_cumprod.clone().double()
            ac[-1] = ac[-1].clamp(min=2.0**-24)  # zero terminal SNR schedules: keep sigma/alpha finite
            self.schedule, time_scale = VPDiscreteSchedule(ac), 1.0
            ptype = sched_cfg.get("prediction_type", "epsilon")
            if ptype not in PREDICTIONS:
                raise UsageError(f"scheduler prediction_type '{ptype}' is not supported; "
                                 f"expected one of {', '.join(PREDICTIONS)}")
            self.prediction = PREDICTIONS[ptype]
        self.vae = self.pipe.vae
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        # SDXL's VAE overflows in fp16: where its config asks (force_upcast), encode/decode in fp32 as diffusers does
        self.vae_dtype = torch.float32 if dtype == torch.float16 and self.vae.config.get("force_upcast") else dtype
        net = getattr(self.pipe, self.net_name)
        # image sides must divide into whole latents and whole network downsamplings (or transformer patches)
        levels = int(net.config.patch_size) if self.family == "sd3" else 2 ** (len(net.config.block_out_channels) - 1)
        self.size_multiple = self.vae_scale * levels
        native = int(net.config.sample_size) * self.vae_scale
        self.resolution = config.resolution or (native, native)  # (H, W)
        m = self.size_multiple
        if any(side % m for side in self.resolution):
            raise UsageError(f"teacher.resolution={list(self.resolution)} must be a multiple of {m} in both sides "
                             f"(VAE factor {self.vae_scale} x the network's downsampling); e.g. "
                             f"teacher.resolution={[max(m, round(s / m) * m) for s in self.resolution]}")
        h, w = (side // self.vae_scale for side in self.resolution)
        self.data_shape = (int(net.config.in_channels), h, w)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", self.net_name):
            module = getattr(self.pipe, name, None)
            if module is not None:
                on_device = not config.offload if name == self.net_name else config.encoders_on_device
                module.requires_grad_(False).eval().to(self.device if on_device else "cpu")
        self.vae_fingerprint = data.fingerprint(self.folder, ["vae"], str(self.vae_dtype), self.config.path)
        text = ["text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"]
        store = data.store_for(config.embedding_cache, "prompts", data.fingerprint(
            self.folder, text, self.family, str(dtype), config.max_sequence_length, self.config.path))
        self.bank = PromptBank(self.pipe, self.family, self.device, dtype, config.max_sequence_length,
                               store=store, max_items=config.prompt_cache_items,
                               encode_device=None if config.encoders_on_device else "cpu")
        set_attention(net, config.attention)
        self.denoiser = DiffusersDenoiser(net, self.family, self.schedule, self.prediction, self.bank,
                                          self.resolution, time_scale, self.vae_scale)
        self.denoiser.to("cpu" if config.offload else self.device)
        self.guidance = config.guidance if config.guidance is not None else DEFAULT_GUIDANCE[self.family]
        self.gan_feature_module = self.denoiser.gan_feature_module

    # -- Teacher protocol ---------------------------------------------------------------------------
    @torch.no_grad()
    def denoise(self, x_t: Tensor, t: Tensor, cond=None, guidance: float | None = None) -> Tensor:
        """x0 of the teacher, with classifier-free guidance ``guidance`` on the raw outputs (None or 1: off)."""
        if not self.config.offload:
            return self.denoiser.guided(x_t, t, cond, guidance)
        self.denoiser.to(self.device)  # teacher.offload: on the device for this forward only
        try:
            return self.denoiser.guided(x_t, t, cond, guidance)
        finally:
            self.denoiser.to("cpu")

    def encode_condition(self, raw) -> Tensor | None:
        """Prompts (a string or a list) -> prompt ids; ids (ints, -1 = unconditional) pass through."""
        if raw is None:
            return None
        if isinstance(raw, str):
            raw = [raw]
        if torch.is_tensor(raw):
            return raw.to(self.device, torch.long)
        raw = list(raw)
        if all(isinstance(r, str) for r in raw):
            return self.bank.add(raw)
        raise UsageError("conditions of a diffusers teacher are prompts (strings); got "
                         f"{type(raw[0]).__name__}")

    @torch.no_grad()
    def to_model_space(self, x: Tensor, seeds: list[int] | None = None) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> scaled VAE latents; latents (cached by data=images) pass through.
        ``seeds``: one per image for the posterior draw (else torch's global RNG)."""
        if x.shape[1] != 3:
            return x
        cfg = self.vae.config
        out = []
        for start in range(0, x.shape[0], 8):
            dist = self.vae.encode(x[start:start + 8].to(self.vae.device, self.vae_dtype)).latent_dist
            if seeds is None:
                z = dist.sample()
            else:
                noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(s))
                                     for s in seeds[start:start + 8]])
                z = dist.mean + dist.std * noise.to(dist.mean)
            out.append((z.float() - (cfg.get("shift_factor") or 0.0)) * cfg.scaling_factor)
        return torch.cat(out).to(self.device)

    @torch.no_grad()
    def to_data_space(self, z: Tensor) -> Tensor:
        """Scaled latents -> images in [-1, 1] (decoded in chunks to bound memory)."""
        cfg = self.vae.config
        out = []
        for chunk in z.split(8):
            lat = chunk.float() / cfg.scaling_factor + (cfg.get("shift_factor") or 0.0)
            out.append(self.vae.decode(lat.to(self.vae.device, self.vae_dtype)).sample.float().clamp(-1, 1))
        return torch.cat(out).to(self.device)

    def trainable_copy(self) -> DiffusersDenoiser:
        """A float32 trainable copy of the teacher network, from the stored weights (never from a bf16 cast)."""
        if self.weight_dtype == torch.float32:
            copy_ = copy.deepcopy(self.denoiser)  # whole wrapper, so its feature-tap hook follows the copy
        else:
            net = getattr(self.pipe, self.net_name)
            variant = {"variant": self.config.variant} if self.config.variant else {}
            fresh = type(net).from_pretrained(self.folder, subfolder=self.net_name, **dtype_kwarg(torch.float32),
                                              **variant)
            set_attention(fresh, self.config.attention, quiet=True)
            copy_ = DiffusersDenoiser(fresh, self.family, self.schedule, self.prediction, self.bank,
                                      self.resolution, self.denoiser.time_scale, self.vae_scale)
        copy_ = copy_.to(self.device, torch.float32).requires_grad_(True).train()
        if self.config.gradient_checkpointing:
            copy_.net.enable_gradient_checkpointing()
        return copy_

    def export(self, model, spec, out_dir: str) -> str | None:
        """``RUN/export``: a diffusers pipeline folder with the student's network and a K-step scheduler."""
        # SFD-v's student (NFEConditioned) wraps the diffusers network
        inner = model if isinstance(model, DiffusersDenoiser) else getattr(model, "net", None)
        if not self.config.export or not isinstance(inner, DiffusersDenoiser):
            return None
        from plugins.diffusers.export import export_pipeline

        if hasattr(model, "standalone"):  # student=shared-lora: its adapter on a plain copy of the base
            model = model.standalone()
        return export_pipeline(self, model, spec, out_dir)


# -- prompts as conditions -----------------------------------------------------------------------
# Text conditions as prompt ids into a cache of encoded prompts.
#
# ``encode_condition(prompts)`` returns a LongTensor of ids; the embeddings (computed once per distinct
# prompt with the pipeline's own ``encode_prompt``, so penultimate hidden states, pooled embeddings and
# SD3's T5 tokens are exactly diffusers') live in a ``PromptBank`` shared by the teacher, the student and
# the critic. Id -1 is the unconditional input the pipeline uses for guidance: zeros for SDXL
# (``force_zeros_for_empty_prompt``), the empty-prompt embedding for SD1.5 and SD3. Ids behave like class
# labels, so objectives slice, concatenate and drop them (label -1) without knowing about text.

NULL = -1


def encode_prompts(pipe, family: str, prompts: list[str], device, negative: bool = False,
                   max_sequence_length: int = 256) -> dict[str, Tensor]:
    """The pipeline's own prompt encoding: ``{"text": [N, L, D]}`` plus ``"pooled": [N, P]`` (SDXL, SD3).
    With ``negative`` it returns the unconditional input the pipeline pairs with an absent negative prompt."""
    if family == "sd15":
        pos, neg = pipe.encode_prompt(prompts, device, 1, negative)
        return {"text": neg if negative else pos}
    if family == "sdxl":
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=negative)
    else:  # sd3
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, None, None, device=device,
                                                          do_classifier_free_guidance=negative,
                                                          max_sequence_length=max_sequence_length)
    return {"text": neg, "pooled": neg_pooled} if negative else {"text": pos, "pooled": pooled}


def size_condition(prompt: str) -> tuple[int, int, int, int] | None:
    """SDXL's (original H, W, crop top, left) carried by a real image's caption (data.ImageCaption), else None:
    generated images are conditioned on their own size with crop 0, as the pipelines do."""
    size, crop = getattr(prompt, "original_size", None), getattr(prompt, "crop_top_left", None)
    return None if size is None or crop is None else (*size, *crop)


class PromptBank:
    """Encoded prompts by id and the null condition. Rows live in a bounded in-memory LRU (``max_items``, CPU,
    the teacher's dtype) backed by an on-disk ``TensorStore`` when given: prompts already encoded by an earlier
    run with the same encoders are read instead of encoded, and evicted rows are read back when drawn.

    An id names a condition: a prompt and, for a real image's caption, that image's size conditioning
    (``size_condition``); ``lookup`` returns it as ``"size"`` [B, 4], NaN where the image is generated."""

    def __init__(self, pipe, family: str, device, dtype, max_sequence_length: int = 256, store=None,
                 max_items: int = 1024, encode_device=None):
        self.pipe, self.family, self.device, self.dtype = pipe, family, torch.device(device), dtype
        self.encode_device = torch.device(encode_device or device)  # where the text encoders run
        self.max_sequence_length, self.store, self.max_items = max_sequence_length, store, max_items
        self.ids: dict[str, int] = {}  # prompt -> row index
        self.prompts: list[str] = []
        self.conditions: dict[tuple, int] = {}  # (prompt, size condition) -> id
        self.entries: list[tuple[int, tuple | None]] = []  # id -> (row index, size condition)
        self.rows: OrderedDict[int, dict[str, Tensor]] = OrderedDict()  # id -> {"text": .., "pooled": ..}
        with torch.no_grad():
            null = encode_prompts(pipe, family, [""], self.encode_device, True, max_sequence_length)
        self.null = {k: v[0].to("cpu", dtype) for k, v in null.items()}

    def __deepcopy__(self, memo):  # shared, never copied (EMA and critic copies of the student)
        return self

    def __len__(self) -> int:
        return len(self.ids)

    def _condition(self, prompt: str) -> int:
        key = (str(prompt), size_condition(prompt))
        if key not in self.conditions:
            self.conditions[key] = len(self.entries)
            self.entries.append((self.ids[key[0]], key[1]))
        return self.conditions[key]

    def _keep(self, i: int, row: dict[str, Tensor]) -> None:
        self.rows[i] = row
        self.rows.move_to_end(i)
        while len(self.rows) > self.max_items and self.store is not None:  # without a store nothing can be evicted
            self.rows.popitem(last=False)

    def _row(self, i: int) -> dict[str, Tensor]:
        row = self.rows.get(i)
        if row is None:
            row = self.store.get(data.content_key(self.prompts[i])) if self.store is not None else None
            if row is None:  # the cache entry vanished: encode again
                enc = encode_prompts(self.pipe, self.family, [self.prompts[i]], self.encode_device, False,
                                     self.max_sequence_length)
                row = {k: v[0].to("cpu", self.dtype) for k, v in enc.items()}
            self._keep(i, row)
        else:
            self.rows.move_to_end(i)
        return row

    @torch.no_grad()
    def add(self, prompts: list[str]) -> Tensor:
        """Ids of ``prompts``; new ones are read from the disk cache or encoded in one batch (and stored)."""
        new = list(dict.fromkeys(str(p) for p in prompts if p not in self.ids))
        missing = []
        for p in new:
            self.ids[p] = len(self.prompts)
            self.prompts.append(p)
            hit = self.store.get(data.content_key(p)) if self.store is not None else None
            if hit is None:
                missing.append(p)
            else:
                self._keep(self.ids[p], hit)
        if missing:
            enc = encode_prompts(self.pipe, self.family, missing, self.encode_device, False,
                                 self.max_sequence_length)
            for j, p in enumerate(missing):
                row = {k: v[j].to("cpu", self.dtype) for k, v in enc.items()}
                if self.store is not None:
                    self.store.put(data.content_key(p), row)
                self._keep(self.ids[p], row)
        return torch.tensor([self._condition(p) for p in prompts], dtype=torch.long, device=self.device)

    def lookup(self, cond: Tensor | None, batch: int, device, dtype) -> dict[str, Tensor]:
        """Batched embeddings for ids ``cond`` ([B], -1 = unconditional; None = all unconditional), and the
        size conditions ``"size"`` [B, 4] (float32, NaN rows: none)."""
        ids = [NULL] * batch if cond is None else torch.as_tensor(cond).reshape(-1).tolist()
        if len(ids) != batch:
            raise ValueError(f"got {len(ids)} prompt ids for a batch of {batch}")
        entries = [(NULL, None) if i < 0 else self.entries[i] for i in ids]
        rows = [self.null if r < 0 else self._row(r) for r, _ in entries]
        out = {k: torch.stack([r[k] for r in rows]).to(device, dtype, non_blocking=True) for k in self.null}
        out["size"] = torch.tensor([size or (math.nan,) * 4 for _, size in entries], dtype=torch.float32,
                                   device=device)
        return out
