"""Datasets of the diffusers plugin: prompt files in every accepted format and their one-line errors, aspect-ratio
buckets for images, and the on-disk caches of prompt embeddings and image latents (reused, bounded, keyed by
the encoders)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytest.importorskip("diffusers")

from tiny_pipelines import sd15_dir, sdxl_dir  # noqa: E402,F401  (fixtures)

from core.errors import UsageError  # noqa: E402
from plugins.diffusers.data import read_prompts  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_teacher(path, family="sd15", **kw):
    from plugins.diffusers.teacher import DiffusersTeacher, DiffusersTeacherConfig

    return DiffusersTeacher(DiffusersTeacherConfig(path=str(path), **kw), "cpu", family)


# -- prompt files ------------------------------------------------------------------------------------
def test_prompt_formats(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\n  two  \n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["one", "two"]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.txt").write_text("from b\n")
    (folder / "a.txt").write_text("from a, line 1\nfrom a, line 2\n")
    (folder / "notes.md").write_text("not a prompt")
    assert read_prompts(str(folder)) == ["from a, line 1", "from a, line 2", "from b"]
    (tmp_path / "p.csv").write_text('id,prompt,score\n1,"a cat, sitting",0.5\n2,"say ""hi""",0.1\n\n3,plain,1\n')
    assert read_prompts(str(tmp_path / "p.csv")) == ["a cat, sitting", 'say "hi"', "plain"]  # header not a prompt
    assert read_prompts(str(tmp_path / "p.csv"), column="id") == ["1", "2", "3"]
    lines = [{"caption": "x, y", "prompt": "first"}, {"prompt": "second", "extra": [1]}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(o) for o in lines) + "\n\n")
    assert read_prompts(str(tmp_path / "p.jsonl")) == ["first", "second"]
    import fsspec

    fsspec.filesystem("memory").pipe("/data/p.csv", b"prompt\nremote one\n")
    assert read_prompts("memory:///data/p.csv") == ["remote one"]


@pytest.mark.parametrize("name,content,column,message", [
    ("empty_dir/", None, "prompt", "folder without .txt files"),
    ("bad.csv", 'prompt,x\n"unterminated,1\n', "prompt", "malformed CSV"),
    ("ragged.csv", "prompt,x\na cat,1,extra\n", "prompt", "row 2 has 3 fields"),
    ("cols.csv", "text,x\na cat,1\n", "prompt", "no column 'prompt' (columns: text, x)"),
    ("bad.jsonl", '{"prompt": "ok"}\n{not json\n', "prompt", "line 2 is not JSON"),
    ("field.jsonl", '{"text": "ok"}\n', "prompt", "no string field 'prompt'"),
    ("blank.txt", "\n\n", "prompt", "holds no prompts"),
    ("missing.txt", None, "prompt", "no such file"),
])
def test_prompt_errors(tmp_path, name, content, column, message):
    path = tmp_path / name
    if name.endswith("/"):
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_prompts(str(path), column)


FAST = ["train.device=cpu", "train.steps=1", "train.batch=2", "train.eval_samples=2", "train.progress=false",
        "train.preview_every=0"]


def run_main(capsys, *args) -> tuple[int, list[str]]:
    """``python -m core.run ARGS`` in this process (the subprocess path is covered in test_diffusers_sources)."""
    from core.run import main

    capsys.readouterr()
    rc = main([*args, *FAST])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_prompt_errors_are_one_line_exit_2_from_the_cli(sd15_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEWSTEP_TENSORBOARD", "0")
    (tmp_path / "prompts").mkdir()
    (tmp_path / "bad.csv").write_text('prompt\n"open\n')
    (tmp_path / "cols.csv").write_text("text\na cat\n")
    for path, message in [(tmp_path / "prompts", "folder without .txt files"), (tmp_path / "bad.csv", "malformed CSV"),
                          (tmp_path / "cols.csv", "no column 'prompt'")]:
        out = tmp_path / "run"
        rc, lines = run_main(capsys, "objective=dmd2", "teacher=sd15", f"teacher.path={sd15_dir}", "data=prompts",
                             f"data.path={path}", f"out={out}")
        assert rc == 2 and len(lines) == 1, lines
        assert lines[0].startswith("fewstep: error:") and message in lines[0]
        assert not out.exists()


def test_moment_matching_on_prompts_names_the_dataset_to_use(sd15_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEWSTEP_TENSORBOARD", "0")
    (tmp_path / "p.txt").write_text("a cat\n")
    rc, lines = run_main(capsys, "objective=mm", "teacher=sd15", f"teacher.path={sd15_dir}", "data=prompts",
                         f"data.path={tmp_path / 'p.txt'}", f"out={tmp_path / 'run'}")
    assert rc == 2 and len(lines) == 1, lines
    assert "data=images data.path=FOLDER" in lines[0]


# -- images: buckets and the latent cache -------------------------------------------------------------
@pytest.fixture()
def shaped_images(tmp_path):
    """Six images: two landscape (2:1), two portrait (1:2), two square; two with captions."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i, (w, h) in enumerate([(40, 20), (64, 30), (20, 40), (30, 62), (24, 24), (33, 31)]):
        arr = (torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"im{i}.png")
    (folder / "im0.txt").write_text("wide one")
    (folder / "im2.txt").write_text("tall one")
    return folder


def test_aspect_buckets_group_images_and_batches(sd15_dir, shaped_images, tmp_path):
    from plugins.diffusers.data import Images, ImagesConfig, bucket_sizes

    teacher = make_teacher(sd15_dir)
    m = teacher.size_multiple
    sizes = bucket_sizes(teacher.resolution, m, 2.0)
    area = teacher.resolution[0] * teacher.resolution[1]
    assert all(h % m == 0 and w % m == 0 and 0.5 <= w / h <= 2 for h, w in sizes)
    assert all(abs(h * w - area) <= m * max(h, w) for h, w in sizes)  # about the teacher's area
    data = Images(ImagesConfig(path=str(shaped_images), buckets=True, cache_dir=str(tmp_path / "c")), teacher)
    shapes = {tuple(lat.shape[-2:]): caps for lat, caps in data.groups}
    assert len(shapes) == 3  # wide, tall, square
    wide = max(shapes, key=lambda s: s[1] / s[0])
    tall = min(shapes, key=lambda s: s[1] / s[0])
    assert "wide one" in shapes[wide] and "tall one" in shapes[tall] and len(shapes[wide]) == 2
    for h, w in shapes:  # each bucket is the one closest in log-aspect to its images'
        assert (h * teacher.vae_scale, w * teacher.vae_scale) in sizes
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        batch = data.sample(3)
        seen.add(tuple(batch["x"].shape[-2:]))
        group = next(g for g in data.groups if g[0].shape[-2:] == batch["x"].shape[-2:])
        for x, c in zip(batch["x"], batch["cond"]):  # every latent comes from that bucket with its caption
            assert any(torch.equal(x, lat) and c == cap for lat, cap in zip(*group))
    assert len(seen) == 3
    # without buckets: one group at the teacher's resolution, as before
    plain = Images(ImagesConfig(path=str(shaped_images), cache_dir="none"), teacher)
    assert plain.latents.shape == (6, *teacher.data_shape)
    assert math.isclose(float(plain.latents.std()), float(plain.latents.std()))


def test_latent_cache_is_reused_and_keyed_by_the_vae(sd15_dir, shaped_images, tmp_path, monkeypatch):
    from plugins.diffusers.data import Images, ImagesConfig

    teacher = make_teacher(sd15_dir)
    cache = str(tmp_path / "cache")
    first = Images(ImagesConfig(path=str(shaped_images), cache_dir=cache), teacher).latents
    state = torch.get_rng_state()
    direct = Images(ImagesConfig(path=str(shaped_images), cache_dir="none"), teacher).latents
    assert torch.equal(first, direct)  # same seeded posterior draw with and without the cache
    assert torch.equal(torch.get_rng_state(), state)  # and the global RNG is left alone

    def no_encoding(*a, **k):
        raise AssertionError("the VAE ran although every latent is cached")

    monkeypatch.setattr(teacher, "to_model_space", no_encoding)
    again = Images(ImagesConfig(path=str(shaped_images), cache_dir=cache), teacher).latents
    assert torch.equal(again, first)
    monkeypatch.undo()
    other = make_teacher(sd15_dir, dtype="bf16")  # other VAE dtype: other fingerprint, no stale entries
    assert other.vae_fingerprint != teacher.vae_fingerprint


def test_prompt_cache_on_disk_is_reused_and_bounded(sdxl_dir, tmp_path, monkeypatch):
    import plugins.diffusers.teacher as teacher_module

    cache = str(tmp_path / "emb")
    prompts = [f"prompt number {i}" for i in range(5)]
    a = make_teacher(sdxl_dir, "sdxl", embedding_cache=cache, prompt_cache_items=2)
    ids = a.encode_condition(prompts)
    assert len(a.bank.rows) <= 2  # bounded: the rest live on disk
    reference = teacher_module.encode_prompts(a.pipe, "sdxl", prompts, "cpu")
    got = a.bank.lookup(ids, 5, "cpu", torch.float32)  # rows evicted from memory are read back
    for k in ("text", "pooled"):
        torch.testing.assert_close(got[k], reference[k])
    calls = []
    real = teacher_module.encode_prompts
    monkeypatch.setattr(teacher_module, "encode_prompts", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    b = make_teacher(sdxl_dir, "sdxl", embedding_cache=cache)  # a later run with the same encoders
    calls.clear()
    ids_b = b.encode_condition(prompts + ["a new prompt"])
    assert calls == [["a new prompt"]]  # only the unseen prompt is encoded
    torch.testing.assert_close(b.bank.lookup(ids_b[:5], 5, "cpu", torch.float32)["text"], reference["text"])
    files = [f for _, _, fs in os.walk(cache) for f in fs if f.endswith(".safetensors")]
    assert len(files) == 6
    remote = make_teacher(sdxl_dir, "sdxl", embedding_cache="memory://fewstep-emb")  # any fsspec URL
    remote.encode_condition(prompts[:2])
    import fsspec

    assert len([p for p in fsspec.filesystem("memory").find("/fewstep-emb") if p.endswith(".safetensors")]) == 2


# -- SDXL's size conditioning from real images; buckets with DMD2's GAN -------------------------------------------
def expected_time_ids(path, target):
    """SDXL's time ids for an image file trained at ``target`` = (H, W), as SDXL's training script derives them:
    the file's size, then the offsets of the center crop in the image resized to cover the target."""
    from PIL import Image

    w, h = Image.open(path).size
    th, tw = target
    scale = max(th / h, tw / w)
    return [h, w, (h * scale - th) / 2, (w * scale - tw) / 2, th, tw]


def captured_time_ids(monkeypatch):
    """Every (latent shape, time ids) the SDXL UNets of this process are called with."""
    from diffusers import UNet2DConditionModel

    calls = []
    real = UNet2DConditionModel.forward

    def spy(self, sample, timestep, *args, added_cond_kwargs=None, **kw):
        if added_cond_kwargs is not None:
            calls.append((tuple(sample.shape[-2:]), added_cond_kwargs["time_ids"].float().clone()))
        return real(self, sample, timestep, *args, added_cond_kwargs=added_cond_kwargs, **kw)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    return calls


def assert_ids(got, want):
    """Sizes exactly; crop offsets to the pixel (rounding conventions differ by at most one)."""
    got = [float(v) for v in got]
    assert got[:2] == want[:2] and got[4:] == want[4:], (got, want)
    assert all(abs(g - w) <= 1 for g, w in zip(got[2:4], want[2:4])), (got, want)


def test_real_images_feed_their_size_and_crop_to_sdxl_time_ids(sdxl_dir, shaped_images, monkeypatch):
    from plugins.diffusers.data import Images, ImagesConfig

    teacher = make_teacher(sdxl_dir, "sdxl")
    data = Images(ImagesConfig(path=str(shaped_images), buckets=True, cache_dir="none"), teacher)
    calls = captured_time_ids(monkeypatch)
    from PIL import Image

    files = {tuple(reversed(Image.open(f).size)): f for f in shaped_images.glob("*.png")}  # (H, W) -> file
    seen = 0
    for latents, captions in data.groups:
        target = tuple(s * teacher.vae_scale for s in latents.shape[-2:])
        cond = teacher.encode_condition(captions)
        calls.clear()
        teacher.denoise(latents, torch.full((len(latents),), 500.0), cond, guidance=3.0)
        (shape, ids), = calls
        assert len(ids) == 2 * len(latents)  # cond and uncond halves, with the same ids as the pipelines pair them
        torch.testing.assert_close(ids[:len(latents)], ids[len(latents):])
        for row, caption in zip(ids, captions):
            assert_ids(row, expected_time_ids(files[caption.original_size], target))
            seen += 1
    assert seen == len(files)
    # a generated image (a plain prompt): its own size, crop 0, as the SDXL pipeline conditions it by default
    calls.clear()
    x = torch.randn(2, *teacher.data_shape)
    teacher.denoise(x, torch.full((2,), 500.0), teacher.encode_condition(["a prompt", "wide one"]))
    h, w = teacher.resolution
    assert calls[0][1].tolist() == [[h, w, 0, 0, h, w]] * 2


def test_dmd2_gan_trains_on_aspect_buckets(sdxl_dir, shaped_images, tmp_path, monkeypatch):
    """data.buckets=true with DMD2's GAN: each iteration runs at one bucket's size (the generator draws its noise
    there), the GAN head built at the teacher's resolution takes every bucket's feature map, and the real
    images' own size and crop reach the UNet."""
    from conftest import train

    from core.registry import get_registry

    if "dmd2" not in get_registry().plugins["objective"]:
        pytest.fail("objective dmd2 is not registered: its built-in entry point is lost")

    calls = captured_time_ids(monkeypatch)
    result = train("objective=dmd2", "teacher=sdxl", f"teacher.path={sdxl_dir}", "data=images",
                   f"data.path={shaped_images}", "data.buckets=true", "data.cache_dir=none", "objective.gan=on",
                   "objective.steps=1", f"out={tmp_path / 'run'}", "train.steps=4", "train.batch=2",
                   "train.eval_samples=2", "train.eval_every=0", "train.preview_every=0", "train.progress=false",
                   "train.device=cpu", "teacher.export=false", "seed=1")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    gan = [v for r in records for k, v in r.items() if "gan" in k]
    assert gan and all(math.isfinite(v) for v in gan)
    head = result["trainer"].nets["gan_head"]
    latent = tuple(result["trainer"].teacher.data_shape[1:])
    shapes = {shape for shape, _ in calls}
    assert len(shapes - {latent}) >= 1 and head.window  # trained on buckets other than the head's own size
    from PIL import Image

    files = {tuple(reversed(Image.open(f).size)): f for f in shaped_images.glob("*.png")}
    real = [(shape, row) for shape, ids in calls for row in ids if tuple(row[:2].int().tolist()) in files
            and row[:2].tolist() != row[4:].tolist()]
    assert real  # real images' rows (the GAN's real branch) carry their files' sizes
    for shape, row in real:
        target = tuple(s * result["trainer"].teacher.vae_scale for s in shape)
        assert_ids(row, expected_time_ids(files[tuple(row[:2].int().tolist())], target))
