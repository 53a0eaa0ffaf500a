"""Where a diffusers teacher comes from and how it is sized: single-file ``.safetensors`` checkpoints in the original
LDM layout (through diffusers' own ``from_single_file``, offline, with a config folder), fsspec URLs, fp16-variant
folders, refused pickles, the VAE's ``force_upcast`` in fp16, and non-square resolutions with SDXL's size
conditioning — each against the pipeline loaded the ordinary way."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")

from tiny_pipelines import save_single_file, sd15_dir, sdxl_dir  # noqa: E402,F401  (fixtures)

from core.errors import UsageError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red cube", "two cats on a mat"]


def make_teacher(path, family="sd15", **kw):
    from plugins.diffusers.teacher import DiffusersTeacher, DiffusersTeacherConfig

    return DiffusersTeacher(DiffusersTeacherConfig(path=str(path), **kw), "cpu", family)


def rewritten(folder, dest, change):
    """A copy of the pipeline in ``folder`` saved to ``dest`` after ``change(pipe)``."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, safety_checker=None) if "sd15" in str(folder) else \
        DiffusionPipeline.from_pretrained(folder)
    change(pipe)
    pipe.save_pretrained(dest)
    return str(dest)


def perturb(pipe):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            for p in [] if module is None else module.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


@torch.no_grad()
def same_outputs(a, b) -> float:
    """Largest difference of the two teachers' guided x0 and decoded images on the same inputs."""
    torch.manual_seed(0)
    x = torch.randn(2, *a.data_shape)
    t = torch.tensor([700.0, 300.0])
    da = a.denoise(x, t, a.encode_condition(PROMPTS), guidance=3.0)
    db = b.denoise(x, t, b.encode_condition(PROMPTS), guidance=3.0)
    return max(float((da - db).abs().max()), float((a.to_data_space(x) - b.to_data_space(x)).abs().max()))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_single_file_checkpoint_loads_through_from_single_file(family, tmp_path, request):
    """An LDM-layout .safetensors of pipeline A (SDXL: both CLIPs, the second in OpenCLIP's layout) with the
    configs of a *different* pipeline B of the same architecture: the teacher is A (weights from the file, not
    from B), converted once into the cache and reused."""
    folder = request.getfixturevalue(f"{family}_dir")
    single = save_single_file(folder, str(tmp_path / "model.safetensors"))
    other = rewritten(folder, tmp_path / f"{family}_other", perturb)
    reference, from_file = make_teacher(folder, family), make_teacher(single, family, config_folder=other)
    assert same_outputs(reference, from_file) < 1e-5
    assert same_outputs(make_teacher(other, family), from_file) > 1e-3  # B's weights would be visibly different
    marker = os.path.join(from_file.folder, ".complete")
    stamp = os.stat(marker).st_mtime_ns
    assert make_teacher(single, family, config_folder=other).folder == from_file.folder
    assert os.stat(marker).st_mtime_ns == stamp  # converted once


def test_single_file_from_fsspec_url(sd15_dir, tmp_path):
    import fsspec

    single = save_single_file(sd15_dir, str(tmp_path / "model.safetensors"))
    fs = fsspec.filesystem("memory")
    fs.pipe("/ckpts/model.safetensors", open(single, "rb").read())
    teacher = make_teacher("memory:///ckpts/model.safetensors", config_folder=sd15_dir)
    assert same_outputs(make_teacher(sd15_dir), teacher) < 1e-5


@pytest.mark.parametrize("path,kw,message", [
    ("model.ckpt", {}, "pickled checkpoint"),
    ("weights.bin", {}, "pickled checkpoint"),
    ("missing.safetensors", {"config_folder": "CFG"}, "no such file"),
    ("model.safetensors", {}, "teacher.config_folder=FOLDER"),
    ("model.safetensors", {"config_folder": "/nowhere"}, "has no model_index.json"),
])
def test_single_file_errors(sd15_dir, tmp_path, path, kw, message):
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04not unpickled")
    (tmp_path / "weights.bin").write_bytes(b"\x80\x04not unpickled")
    (tmp_path / "model.safetensors").write_bytes(b"")
    kw = {k: (sd15_dir if v == "CFG" else v) for k, v in kw.items()}
    with pytest.raises(UsageError, match=message):
        make_teacher(tmp_path / path, **kw)


def test_fp16_variant_folder(sd15_dir, tmp_path):
    """A folder that holds only ``*.fp16.safetensors`` weights: teacher.variant=fp16 loads it; without it the error
    names the option."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(sd15_dir, safety_checker=None)
    pipe.to(torch.float16).save_pretrained(tmp_path / "fp16", variant="fp16")
    with pytest.raises(UsageError, match="teacher.variant=fp16"):
        make_teacher(tmp_path / "fp16")
    teacher = make_teacher(tmp_path / "fp16", variant="fp16")
    assert teacher.pipe.unet.dtype == torch.float32  # loaded in the teacher's dtype (fp32 on CPU)
    assert same_outputs(make_teacher(sd15_dir), teacher) < 5e-3  # equal up to the fp16 rounding of the weights
    student = teacher.trainable_copy()  # reloads the variant from disk in fp32
    assert student.dtype == torch.float32


@torch.no_grad()
def test_fp16_teacher_honours_vae_force_upcast(sd15_dir, tmp_path):
    """A VAE whose decoder overflows fp16 (65504) in its first conv: with force_upcast (SDXL's VAE config) the
    fp16 teacher decodes in fp32 and gives finite images; the same VAE without it gives inf/NaN."""
    def overflowing(force_upcast):
        def change(pipe):
            pipe.vae.decoder.conv_in.weight.mul_(2e4)  # weights fit fp16, activations do not
            pipe.vae.register_to_config(force_upcast=force_upcast)
        return change

    upcast = make_teacher(rewritten(sd15_dir, tmp_path / "up", overflowing(True)), dtype="fp16")
    plain = make_teacher(rewritten(sd15_dir, tmp_path / "plain", overflowing(False)), dtype="fp16")
    assert upcast.vae.dtype == torch.float32 and plain.vae.dtype == torch.float16
    z = torch.randn(2, *upcast.data_shape)
    assert torch.isfinite(upcast.to_data_space(z)).all()
    assert not torch.isfinite(plain.vae.decode(z.half() / 0.18215).sample).all()  # the overflow is real
    img = torch.rand(2, 3, *upcast.resolution) * 2 - 1
    assert torch.isfinite(upcast.to_model_space(img)).all()


@torch.no_grad()
def test_non_square_sdxl_matches_the_pipeline(sdxl_dir):
    """teacher.resolution=[H,W]: latents H/8 x W/8 and SDXL's time ids (H, W, 0, 0, H, W) as the pipeline builds
    them for height=H, width=W — the 1-step pipeline output equals the teacher's guided x0."""
    import diffusers

    teacher = make_teacher(sdxl_dir, "sdxl", resolution=[16, 24])
    assert teacher.resolution == (16, 24) and teacher.data_shape == (4, 8, 12)
    pipe, original = teacher.pipe, teacher.pipe.scheduler
    pipe.scheduler = diffusers.DDIMScheduler.from_config(original.config, timestep_spacing="trailing",
                                                         clip_sample=False, set_alpha_to_one=True)
    z = torch.randn(2, *teacher.data_shape)
    try:
        out = pipe(PROMPTS, latents=z.clone(), num_inference_steps=1, guidance_scale=5.0, output_type="latent",
                   height=16, width=24).images
    finally:
        pipe.scheduler = original
    ours = teacher.denoise(z, torch.full((2,), 999.0), teacher.encode_condition(PROMPTS), guidance=5.0)
    torch.testing.assert_close(ours, out.float(), rtol=1e-4, atol=1e-4 * float(out.abs().max()))
    square = make_teacher(sdxl_dir, "sdxl", resolution=24)  # the size conditioning matters: square ids differ
    ids_sq, ids = square.denoiser.time_ids(torch.zeros(1, 4, 12, 12)), teacher.denoiser.time_ids(z)
    assert ids[0].tolist() == [16, 24, 0, 0, 16, 24] and ids_sq[0].tolist() == [24, 24, 0, 0, 24, 24]


@pytest.mark.parametrize("value,message", [
    ("[16,18]", "must be a multiple of 4"), ("[16,0]", "positive size"), ("abc", "positive size"),
    ("[1,2,3]", "positive size")])
def test_bad_resolution_is_one_line_exit_2(sd15_dir, tmp_path, value, message, capsys, monkeypatch):
    from core.run import main

    monkeypatch.setenv("FEWSTEP_TENSORBOARD", "0")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    args = ["objective=dmd2", "teacher=sd15", f"teacher.path={sd15_dir}", f"teacher.resolution={value}",
            "data=prompts", f"data.path={prompts}", f"out={tmp_path / 'run'}", "train.device=cpu"]
    capsys.readouterr()
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fewstep: error:") and message in lines[0], lines
    assert not (tmp_path / "run").exists()
    if value == "[16,18]":  # and the same from a fresh interpreter: nothing but that line on stderr
        proc = subprocess.run([sys.executable, "-m", "core.run", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONPATH": ROOT, "FEWSTEP_TENSORBOARD": "0"})
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == lines, proc.stderr[-2000:]


def test_fsspec_folder_teacher_and_cache_reuse(sd15_dir, tmp_path):
    """A pipeline folder behind an fsspec URL is copied once into teacher.cache_dir."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.put(sd15_dir.rstrip("/") + "/", "/teachers/sd15/", recursive=True)
    teacher = make_teacher("memory:///teachers/sd15", cache_dir=str(tmp_path / "cache"))
    assert teacher.folder.startswith(str(tmp_path / "cache"))
    assert same_outputs(make_teacher(sd15_dir), teacher) < 1e-6
    shutil.rmtree(str(tmp_path / "cache"))
