"""The diffusers teacher wrapper against diffusers itself: x0 from the schedulers' own step functions and
from the pipelines' own 1-step generation, for eps, v and flow, with and without guidance."""

from __future__ import annotations

import functools
import os

import pytest
import torch

pytest.importorskip("diffusers")

from tiny_pipelines import sd3_dir, sd15_dir, sd15_v_dir, sdxl_dir  # noqa: E402,F401  (fixtures)

from core.errors import UsageError  # noqa: E402

PROMPTS = ["a red cube", "two cats on a mat"]


SEQ3 = 16  # SD3 T5 tokens (zeros without T5): short keeps CPU tests fast


@functools.lru_cache(maxsize=None)
def _cached(path, family, items):
    from plugins.diffusers.teacher import DiffusersTeacher, DiffusersTeacherConfig

    return DiffusersTeacher(DiffusersTeacherConfig(path=path, max_sequence_length=SEQ3, **dict(items)), "cpu", family)


def teacher_for(path, family, cached=True, **kw):
    """A teacher on a tiny pipeline; shared across tests unless ``cached=False`` (options that change it)."""
    if cached:
        return _cached(path, family, tuple(sorted(kw.items())))
    return _cached.__wrapped__(path, family, tuple(sorted(kw.items())))


def reference_output(teacher, x, t_model, prompts, guidance):
    """The network output the diffusers pipelines compute: their encode_prompt, their CFG formula."""
    pipe, fam = teacher.pipe, teacher.family
    n = x.shape[0]
    if fam == "sd15":
        pos, neg = pipe.encode_prompt(prompts, "cpu", 1, True)
        extra_c = extra_u = {}
    else:
        kw = {"max_sequence_length": SEQ3} if fam == "sd3" else {}
        args = (prompts, None, None) if fam == "sd3" else (prompts,)
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(*args, device="cpu", do_classifier_free_guidance=True, **kw)
    def call(emb, pooled_):
        if fam == "sd3":
            return pipe.transformer(hidden_states=x, timestep=t_model, encoder_hidden_states=emb,
                                    pooled_projections=pooled_, return_dict=False)[0]
        kw = {}
        if fam == "sdxl":
            h, w = teacher.resolution
            ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(n, -1)
            kw["added_cond_kwargs"] = {"text_embeds": pooled_, "time_ids": ids}
        return pipe.unet(x, t_model, encoder_hidden_states=emb, return_dict=False, **kw)[0]
    p_c = pooled if fam != "sd15" else None
    p_u = neg_pooled if fam != "sd15" else None
    out_c = call(pos, p_c)
    if guidance == 1:
        return out_c
    out_u = call(neg, p_u)
    return out_u + guidance * (out_c - out_u)


@pytest.mark.parametrize("guidance", [1.0, 4.5])
@pytest.mark.parametrize("which", ["sd15", "sd15_v", "sdxl"])
@torch.no_grad()
def test_vp_x0_matches_scheduler_pred_original_sample(which, guidance, request):
    from diffusers import DDPMScheduler

    path = request.getfixturevalue(f"{which}_dir")
    teacher = teacher_for(path, which.split("_")[0])
    sched = DDPMScheduler.from_config(teacher.pipe.scheduler.config, clip_sample=False)
    assert teacher.prediction == ("v" if which.endswith("_v") else "eps")
    cond = teacher.encode_condition(PROMPTS)
    for t in (999, 600, 37):
        x = torch.randn(2, *teacher.data_shape)
        ours = teacher.denoise(x, torch.full((2,), float(t)), cond, guidance=guidance)
        out = reference_output(teacher, x, torch.tensor(t), PROMPTS, guidance)
        ref = torch.stack([sched.step(out[i:i + 1], t, x[i:i + 1]).pred_original_sample[0] for i in range(2)])
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@torch.no_grad()
def test_flow_x0_gives_the_scheduler_euler_step(sd3_dir, guidance):
    """FlowMatchEulerDiscreteScheduler.step: x_next = x + (s_next - s) v; ours implies v = (x - x0) / s."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    teacher = teacher_for(sd3_dir, "sd3")
    assert teacher.prediction == "flow" and teacher.schedule.name == "flow"
    sched = FlowMatchEulerDiscreteScheduler.from_config(teacher.pipe.scheduler.config)
    sched.set_timesteps(5)
    cond = teacher.encode_condition(PROMPTS)
    for i in (0, 2, 4):
        sched._step_index = i
        s, s_next = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
        x = torch.randn(2, *teacher.data_shape)
        x0 = teacher.denoise(x, torch.full((2,), s), cond, guidance=guidance)
        v = reference_output(teacher, x, sched.timesteps[i].expand(2), PROMPTS, guidance)
        ref = sched.step(v, sched.timesteps[i], x).prev_sample
        ours = x + (s_next - s) * (x - x0) / s
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("which,scheduler", [("sd15", "DDIMScheduler"), ("sdxl", "DDIMScheduler"),
                                             ("sd3", None)])
@pytest.mark.parametrize("guidance", [1.0, 6.0])
@torch.no_grad()
def test_one_step_pipeline_output_equals_teacher_x0(which, scheduler, guidance, request):
    """A 1-step pipeline call returns the guided x0 at the top timestep: diffusers' whole conditioning path
    (two encoders, pooled embeddings, SDXL time ids, zeros / empty-prompt uncond) against ours."""
    import diffusers

    teacher = teacher_for(request.getfixturevalue(f"{which}_dir"), which)
    pipe, original = teacher.pipe, teacher.pipe.scheduler
    if scheduler:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(original.config, timestep_spacing="trailing",
                                                                   clip_sample=False, set_alpha_to_one=True)
    z = torch.randn(2, *teacher.data_shape)
    res = teacher.resolution
    kw = {"max_sequence_length": SEQ3} if which == "sd3" else {}
    try:
        out = pipe(PROMPTS, latents=z.clone(), num_inference_steps=1, guidance_scale=guidance, output_type="latent",
                   height=res[0], width=res[1], **kw).images
    finally:
        pipe.scheduler = original
    t = 1.0 if which == "sd3" else 999.0
    ours = teacher.denoise(z, torch.full((2,), t), teacher.encode_condition(PROMPTS), guidance=guidance)
    torch.testing.assert_close(ours, out.float(), rtol=1e-4, atol=1e-4 * float(out.abs().max()))


@torch.no_grad()
def test_prompt_bank_encodes_once_and_null_is_the_pipelines_uncond(sdxl_dir, sd15_dir):
    xl = teacher_for(sdxl_dir, "sdxl")
    before = len(xl.bank)
    ids = xl.encode_condition(["bank b", "bank a", "bank b"]).tolist()
    assert ids[0] == ids[2] != ids[1] and len(xl.bank) == before + 2
    assert xl.encode_condition(["bank a"]).tolist() == [ids[1]] and len(xl.bank) == before + 2
    emb = xl.bank.lookup(torch.tensor([-1, ids[0]]), 2, "cpu", torch.float32)
    assert emb["text"][0].abs().max() == 0 and emb["pooled"][0].abs().max() == 0  # SDXL: zeros
    assert emb["text"][1].abs().max() > 0
    sd = teacher_for(sd15_dir, "sd15")
    empty = sd.pipe.encode_prompt([""], "cpu", 1, False)[0][0]
    torch.testing.assert_close(sd.bank.lookup(None, 1, "cpu", torch.float32)["text"][0], empty)


@torch.no_grad()
def test_vae_spaces(sd3_dir):
    teacher = teacher_for(sd3_dir, "sd3")
    img = torch.rand(2, 3, *teacher.resolution) * 2 - 1
    z = teacher.to_model_space(img)
    assert z.shape == (2, *teacher.data_shape)
    assert teacher.to_model_space(z) is z  # cached latents pass through
    vae = teacher.vae
    ref = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(teacher.to_data_space(z), ref)


def test_trainable_copy_and_lora(sd15_dir):
    from plugins.diffusers.networks import NetConfig, add_lora

    teacher = teacher_for(sd15_dir, "sd15", gradient_checkpointing=True)  # copies only
    cond = teacher.encode_condition(PROMPTS)
    x, t = torch.randn(2, *teacher.data_shape), torch.tensor([500.0, 20.0])
    full = teacher.trainable_copy()
    assert full.net.is_gradient_checkpointing
    torch.testing.assert_close(full.denoise(x, t, cond), teacher.denoise(x, t, cond))
    lora = add_lora(teacher.trainable_copy(), NetConfig(lora_rank=4))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("time_emb_proj" in n for n in trainable) and any("to_q" in n for n in trainable)
    out = lora.denoise(x, t, cond)
    torch.testing.assert_close(out, teacher.denoise(x, t, cond))  # LoRA B starts at zero
    out.square().mean().backward()
    assert all(p.grad is not None for p in lora.parameters() if p.requires_grad)
    assert teacher.pipe.unet.conv_in.weight.grad is None


@pytest.mark.parametrize("which", ["sdxl", "sd3"])
@torch.no_grad()
def test_gan_feature_module_yields_a_feature_map(which, request):
    teacher = teacher_for(request.getfixturevalue(f"{which}_dir"), which)
    net = teacher.trainable_copy()
    seen = []
    net.get_submodule(net.gan_feature_module).register_forward_hook(lambda m, a, out: seen.append(out))
    net.denoise(torch.randn(3, *teacher.data_shape), torch.full((3,), 0.5 if which == "sd3" else 500.0))
    assert len(seen) == 1 and seen[0].ndim == 4 and seen[0].shape[0] == 3


def test_usage_errors(sd15_dir, tmp_path):
    with pytest.raises(UsageError, match="use teacher=sd15"):
        teacher_for(sd15_dir, "sdxl")
    with pytest.raises(UsageError, match="teacher.path"):
        teacher_for("", "sdxl")
    with pytest.raises(UsageError, match="no model_index.json"):
        teacher_for(str(tmp_path), "sd15")
    with pytest.raises(UsageError, match="no such folder"):
        teacher_for(str(tmp_path / "missing"), "sd15")


def test_xformers_falls_back_to_sdpa_with_a_message(sd15_dir, capsys):
    if torch.cuda.is_available():
        pytest.skip("the fallback is for machines without CUDA")
    teacher_for(sd15_dir, "sd15", cached=False, attention="xformers")
    assert "using PyTorch SDPA" in capsys.readouterr().err


def test_gpu_benchmark_step_runs_on_a_tiny_unet():
    """The SDXL GPU benchmark's DMD2 iteration, on a tiny SDXL-architecture UNet on CPU (keeps it runnable)."""
    import importlib.util
    import os

    from core.registry import get_registry

    if "dmd2" not in get_registry().plugins["objective"]:
        pytest.fail("objective 'dmd2' is not registered: the built-in entry point of plugins/dmd2.py is lost")
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_sdxl_gpu.py")
    spec = importlib.util.spec_from_file_location("bench_sdxl_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tiny = dict(bench.SDXL_UNET, sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 1), attention_head_dim=(2, 4), cross_attention_dim=64,
                addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32, norm_num_groups=8)
    step, nets = bench.dmd2_setup(tiny, {"text": (16, 64), "pooled": (32,)}, "cpu", batch=2, lora_rank=4)
    before = {k: v.detach().clone() for k, v in nets["critic"].state_dict().items()}
    lora = {n: p for n, p in nets["student"].named_parameters() if "lora_" in n}
    lora_before = {n: p.detach().clone() for n, p in lora.items()}
    step()
    assert any(not torch.equal(before[k], v) for k, v in nets["critic"].state_dict().items())
    assert lora and any(not torch.equal(lora_before[n], p) for n, p in lora.items())


def test_fsspec_urls_are_copied_once_and_hub_ids_fail_clearly_offline(sd15_dir, tmp_path, monkeypatch):
    import huggingface_hub

    from plugins.diffusers import loading

    cache = tmp_path / "cache"
    local = loading.local_folder(f"file://{sd15_dir}", str(cache))
    assert os.path.exists(os.path.join(local, "unet", "config.json")) and local.startswith(str(cache))
    assert loading.local_folder(f"file://{sd15_dir}", str(cache)) == local  # cached: no second copy
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match="hub could not serve it"):
        loading.local_folder("someone/some-pipeline")


@pytest.mark.parametrize("value, expected", [("32", (32, 32)), (32, (32, 32)), ("[32,48]", (32, 48)), ([32], (32, 32)),
                                             ([16, 24], (16, 24)), ("none", None)])
def test_resolution_parses_n_and_h_w(value, expected):
    from plugins.diffusers.teacher import height_width

    assert height_width(value, "teacher.resolution") == expected


@pytest.mark.parametrize("value", ["0", "1.5", "[8,8,8]", "x", [-8, 8]])
def test_resolution_rejects_bad_sizes(value):
    from plugins.diffusers.teacher import height_width

    with pytest.raises(ValueError, match="positive size"):
        height_width(value, "teacher.resolution")
