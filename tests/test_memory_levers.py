"""Memory levers of a diffusers teacher. ``teacher.encoders_on_device=false``: the text encoders and the VAE stay
on the CPU (their outputs are cached on disk), and everything they give is what the default teacher gives, on
the training device. ``teacher.offload=true``: the teacher's UNet is on the device only during its forwards,
with the same outputs. The planner counts both off the GPU. The CPU tests check the plumbing; the GPU tests,
the placement and the memory."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from tiny_pipelines import sdxl_dir  # noqa: E402,F401  (fixture)

from conftest import run_config  # noqa: E402

PROMPTS = ["a red cube", "two cats on a mat"]


def teacher(path, device, on_device, offload=False, dtype="auto"):
    from plugins.diffusers.teacher import DiffusersTeacher, DiffusersTeacherConfig

    return DiffusersTeacher(DiffusersTeacherConfig(path=path, encoders_on_device=on_device, embedding_cache="none",
                                                   offload=offload, dtype=dtype), device, "sdxl")


def outputs(t, device):
    cond = t.encode_condition(PROMPTS)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *t.data_shape, generator=g).to(device)
    images = torch.rand(2, 3, *t.resolution, generator=g).to(device) * 2 - 1
    emb = t.denoiser.embed(cond, 2, device)
    with torch.no_grad():
        x0 = t.denoise(x, torch.tensor([900.0, 300.0], device=device), cond, 5.0)
    return {"cond": cond, **emb, "x0": x0, "decoded": t.to_data_space(x),
            "encoded": t.to_model_space(images, seeds=[1, 2])}


def compare(device, path, tol):
    ref, off = teacher(path, device, True), teacher(path, device, False)
    offloaded = teacher(path, device, True, offload=True)
    assert all(p.device.type == "cpu" for p in offloaded.pipe.unet.parameters())
    a, c = outputs(ref, device), outputs(offloaded, device)
    for key in a:  # same device, same kernels: equal (the SDXL size rows hold NaN for "no size given")
        assert c[key].device == a[key].device and torch.allclose(c[key], a[key], rtol=0, atol=0, equal_nan=True), key
    assert all(p.device.type == "cpu" for p in offloaded.pipe.unet.parameters())  # back after each forward
    assert all(p.device.type == "cpu" for m in (off.pipe.text_encoder, off.pipe.text_encoder_2, off.vae)
               for p in m.parameters())
    assert all(p.device.type == torch.device(device).type for p in off.pipe.unet.parameters())
    a, b = outputs(ref, device), outputs(off, device)
    for key in a:
        assert b[key].device == a[key].device, key
        if tol is not None:
            assert torch.allclose(b[key].float(), a[key].float(), rtol=tol, atol=tol, equal_nan=True), key
    return ref, off


def errors(got, ref):
    """Largest absolute difference per output (NaN where the reference has NaN, nowhere else)."""
    out = {}
    for key in ref:
        a, b = ref[key].float(), got[key].float().to(ref[key].device)
        assert torch.equal(a.isnan(), b.isnan()), key
        out[key] = (b - a).nan_to_num(0).abs().max().item()
    return out


def test_encoders_on_the_cpu_give_the_same_outputs(sdxl_dir):
    compare("cpu", sdxl_dir, 0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_encoders_leave_the_gpu(sdxl_dir):
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    ref = teacher(sdxl_dir, "cuda", True)
    with_encoders = torch.cuda.memory_allocated() - before
    del ref
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    off = teacher(sdxl_dir, "cuda", False)
    without = torch.cuda.memory_allocated() - before
    encoders = sum(p.numel() * p.element_size() for m in (off.pipe.text_encoder, off.pipe.text_encoder_2, off.vae)
                   for p in m.parameters())
    assert with_encoders - without >= encoders
    del off
    compare("cuda", sdxl_dir, None)  # placement and offload; the outputs differ by bf16 rounding, checked below
    # The teacher is bf16 on both devices, and bf16 on the CPU rounds differently from bf16 on the GPU, so the two
    # placements cannot agree to a fixed tolerance (x0 differed by 0.16 at |x0| ~ 12 on an H100). Against a float32
    # teacher on the GPU, moving the encoders off must cost no more than bf16's own error.
    ref = outputs(teacher(sdxl_dir, "cuda", True, dtype="fp32"), "cuda")
    on = errors(outputs(teacher(sdxl_dir, "cuda", True), "cuda"), ref)
    off = errors(outputs(teacher(sdxl_dir, "cuda", False), "cuda"), ref)
    for key in ref:
        scale = ref[key].float().nan_to_num(0).abs().max().item()
        assert off[key] <= 2 * on[key] + 1e-3 * scale, (key, off[key], on[key], scale)


def test_planner_reads_the_option(sdxl_dir, tmp_path):
    from core.plan_model import setting_of

    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    run = ["objective=dmd2", "teacher=sdxl", f"teacher.path={sdxl_dir}", "data=prompts", f"data.path={prompts}"]
    on, off = (setting_of(run_config(*run, f"teacher.encoders_on_device={v}")) for v in ("true", "false"))
    assert on.encoders_on_gpu and not off.encoders_on_gpu
    offload = setting_of(run_config(*run, "teacher.offload=true"))
    assert on.teacher_on_gpu and not offload.teacher_on_gpu
