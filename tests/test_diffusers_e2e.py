"""End to end on CPU: ``python -m core.run objective=... teacher=sdxl|sd15|sd3 data=prompts`` for a few steps on
tiny pipelines, then the export loaded with plain diffusers (no fewstep import) and sampled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("diffusers")

from tiny_pipelines import exported_images, sd3_dir, sd15_dir, sdxl_dir  # noqa: E402,F401  (fixtures)

from core.registry import get_registry  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["train.steps=2", "train.batch=2", "train.eval_samples=2", "train.log_every=1", "train.ckpt_every=2",
        "train.eval_every=0", "train.preview_every=0", "train.progress=false", "train.device=cpu"]


def needs(objective: str):
    if objective not in get_registry().plugins["objective"]:
        pytest.fail(f"objective '{objective}' is not registered: the built-in entry point of plugins/{objective}.py is lost")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red cube\na photo of a cat\n\nsunset over the sea\n")
    return str(path)


def cli(module: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEWSTEP_TENSORBOARD": "0", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def plain_diffusers(code: str) -> dict:
    """Run ``code`` in a fresh interpreter that cannot import fewstep; it prints one JSON line."""
    guard = "import sys; sys.modules['core'] = None; sys.modules['plugins'] = None\n"
    proc = subprocess.run([sys.executable, "-c", guard + textwrap.dedent(code)], cwd="/", capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_and_sample(export: str, family: str, call: dict) -> dict:
    """The export with its stock scheduler and the recorded call, in plain diffusers."""
    extra = ", text_encoder_3=None, tokenizer_3=None" if family == "sd3" else ""
    return plain_diffusers(f"""
        import json, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({export!r}{extra})
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(0)
        out = pipe(["a red cube", "a cat"], generator=g, output_type="pt", **{call!r})
        img = out.images
        print(json.dumps({{"shape": list(img.shape), "finite": bool(torch.isfinite(img).all()),
                          "std": float(img.std()), "scheduler": type(pipe.scheduler).__name__,
                          "timesteps": [float(t) for t in pipe.scheduler.timesteps]}}))
    """)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three small images, two with captions: real data for DMD2's GAN term."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    gen = torch.Generator().manual_seed(0)
    for i, size in enumerate((20, 16, 24)):
        arr = (torch.rand(size, size + 4, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"img{i}.png")
    (folder / "img0.txt").write_text("a red cube")
    (folder / "img2.txt").write_text("a photo of a cat")
    return str(folder)


slow = pytest.mark.slow
CASES = [  # (objective, teacher, data, extra overrides, expected scheduler)
    ("dmd2", "sdxl", "prompts", ["objective.steps=4"], "LCMScheduler"),
    pytest.param("dmd2", "sd15", "images", ["objective.steps=2", "objective.gan=on"], "LCMScheduler", marks=slow),
    pytest.param("dmd2", "sd3", "prompts", ["objective.steps=1", "teacher.max_sequence_length=16"],
                 "FlowMatchEulerDiscreteScheduler", marks=slow),
    pytest.param("sfd", "sdxl", "prompts", ["objective.nfe=2", "objective.substeps=1", "objective.sigma_min=0.03"],
                 "DDIMScheduler", marks=slow),
    pytest.param("mm", "sdxl", "images", ["objective.steps=2"], "DDIMScheduler", marks=slow),
]


@pytest.mark.parametrize("objective,teacher,data,extra,scheduler", CASES,
                         ids=["dmd2-sdxl", "dmd2-sd15-gan", "dmd2-sd3", "sfd-sdxl", "mm-sdxl"])
def test_cli_run_then_plain_diffusers_samples(objective, teacher, data, extra, scheduler, tmp_path, request):
    needs(objective)
    path = request.getfixturevalue(f"{teacher}_dir")
    out = tmp_path / "run"
    cli("core.run", f"objective={objective}", f"teacher={teacher}", f"teacher.path={path}", f"data={data}",
        f"data.path={request.getfixturevalue(data)}", f"out={out}", *FAST, *extra)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and all(torch.isfinite(torch.tensor(v)) for r in records
                                           for k, v in r.items() if isinstance(v, float))
    if objective == "dmd2" and data == "images":  # the GAN term ran on the critic's mid-block features
        assert any(k.startswith("critic/") and "gan" in k for r in records for k in r), records
    export = out / "export"
    meta = json.loads((export / "fewstep_sampling.json").read_text())
    assert meta["scheduler"] == scheduler
    result = load_and_sample(str(export), teacher, meta["call_kwargs"])
    assert result["shape"] == [2, 3, 16, 16] and result["finite"] and result["std"] > 0
    assert result["scheduler"] == scheduler
    if meta["matches_student_sampler"]:
        times = meta["times"][:-1]
        scale = 1000.0 if teacher == "sd3" else 1.0
        assert result["timesteps"] == pytest.approx([t * scale for t in times], abs=1.0)
    if objective == "dmd2" and teacher == "sdxl":  # the DMD2 4-step SDXL schedule, as the method note says
        assert result["timesteps"] == [999, 749, 499, 249] and meta["matches_student_sampler"]
        grid = tmp_path / "grid.png"
        cli("core.sample", f"run={out}", "prompt=a red cube", "num=4", f"out={grid}", "device=cpu")
        from PIL import Image

        assert Image.open(grid).size == (32, 32)  # 2 x 2 grid of 16 px images


def test_lora_student_exports_merged_unet_and_loadable_lora(sdxl_dir, prompts, tmp_path):
    """student.lora_rank > 0: RUN/export holds the merged UNet, and RUN/export/lora loads with plain diffusers'
    load_lora_weights onto the teacher pipeline and gives the same UNet (alpha/rank scaling included)."""
    needs("dmd2")
    from conftest import train

    out = tmp_path / "run"
    result = train("objective=dmd2", "teacher=sdxl", f"teacher.path={sdxl_dir}", "data=prompts",
                   f"data.path={prompts}", f"out={out}", "student.lora_rank=4", "objective.lr=0.01", *FAST)
    student = result["trainer"].student
    assert all("lora_" in n for n, p in student.named_parameters() if p.requires_grad)
    assert (out / "export" / "lora" / "pytorch_lora_weights.safetensors").exists()
    r = plain_diffusers(f"""
        import json, torch
        from diffusers import DiffusionPipeline
        export = DiffusionPipeline.from_pretrained({str(out / 'export')!r})
        base = DiffusionPipeline.from_pretrained({sdxl_dir!r})
        torch.manual_seed(0)
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 500])
        emb, pooled = torch.randn(2, 16, 80), torch.randn(2, 48)
        kw = dict(encoder_hidden_states=emb, added_cond_kwargs={{"text_embeds": pooled,
                  "time_ids": torch.tensor([[16., 16, 0, 0, 16, 16]]).expand(2, -1)}})
        with torch.no_grad():
            teacher = base.unet(x, t, **kw).sample
            merged = export.unet(x, t, **kw).sample
            base.load_lora_weights({str(out / 'export' / 'lora')!r})
            lora = base.unet(x, t, **kw).sample
        print(json.dumps({{"lora_vs_merged": float((lora - merged).abs().max()),
                          "merged_vs_teacher": float((merged - teacher).abs().max())}}))
    """)
    assert r["merged_vs_teacher"] > 1e-4  # training moved the student
    assert r["lora_vs_merged"] < 1e-3 * r["merged_vs_teacher"] + 1e-6
    # `core.sample seed=S` (which loads the LoRA student) and the export with torch.manual_seed(S): same images
    npz = tmp_path / "s.npz"
    cli("core.sample", f"run={out}", "prompt=a red cube", "num=2", "seed=5", f"out={npz}", "device=cpu")
    import numpy as np
    ours = torch.from_numpy(np.load(npz)["samples"]) / 2 + 0.5
    theirs, _ = exported_images(out / "export", ["a red cube"] * 2, seed=5)
    assert float((theirs - ours).abs().max()) <= 1e-3


def test_images_dataset_caches_latents_with_captions(sd15_dir, images):
    from plugins.diffusers.data import Images, ImagesConfig
    from plugins.diffusers.teacher import DiffusersTeacher, DiffusersTeacherConfig

    teacher = DiffusersTeacher(DiffusersTeacherConfig(path=sd15_dir), "cpu", "sd15")
    data = Images(ImagesConfig(path=images, caption="default caption"), teacher)
    assert data._groups is None  # nothing encoded until data is drawn
    assert data.latents.shape == (3, *teacher.data_shape)
    assert data.captions == ["a red cube", "default caption", "a photo of a cat"]
    torch.manual_seed(1)
    batch = data.sample(5)
    for x, c in zip(batch["x"], batch["cond"]):  # each latent comes with its own image's caption
        assert torch.equal(x, data.latents[data.captions.index(c)])
    assert teacher.to_model_space(batch["x"]) is batch["x"]


def test_prompts_dataset_and_errors(tmp_path):
    from core.errors import UsageError
    from plugins.diffusers.data import Prompts, PromptsConfig

    f = tmp_path / "p.txt"
    f.write_text("one\n\n  two  \n")
    assert Prompts(PromptsConfig(path=str(f))).prompts == ["one", "two"]
    (tmp_path / "empty.txt").write_text("\n\n")
    for path, msg in [("", "needs data.path"), (str(tmp_path / "nope.txt"), "no such file"),
                      (str(tmp_path / "empty.txt"), "holds no prompts")]:
        with pytest.raises(UsageError, match=msg):
            Prompts(PromptsConfig(path=path))


def test_without_diffusers_list_works_and_runs_say_how_to_install(sdxl_dir):
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "from core.run import main\n"
            "sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": ROOT, "FEWSTEP_TENSORBOARD": "0"}
    listed = subprocess.run([sys.executable, "-c", code, "list"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert listed.returncode == 0 and "sdxl" in listed.stdout and "prompts" in listed.stdout
    run = subprocess.run([sys.executable, "-c", code, "objective=dmd2", "teacher=sdxl", f"teacher.path={sdxl_dir}",
                          "data=prompts", "data.path=x.txt", "out=/tmp/never"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 2 and "pip install 'fewstep[diffusers]'" in run.stderr


def test_images_latents_are_deterministic_and_leave_the_global_rng_alone(sd15_dir, images):
    from plugins.diffusers.data import Images, ImagesConfig
    from plugins.diffusers.teacher import DiffusersTeacher, DiffusersTeacherConfig

    teacher = DiffusersTeacher(DiffusersTeacherConfig(path=sd15_dir), "cpu", "sd15")
    state = torch.get_rng_state()
    a = Images(ImagesConfig(path=images), teacher).latents
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, Images(ImagesConfig(path=images), teacher).latents)


def test_sfd_v_run_exports_the_student_at_its_sampling_nfe(sdxl_dir, prompts, tmp_path):
    """objective=sfd-v on a diffusers teacher: the default student is the NFE-conditioned copy (copy-nfe), and the
    export, a plain diffusers UNet with the NFE embedding folded in, gives `core.sample seed=S`'s images."""
    needs("sfd-v")
    out = tmp_path / "run"
    cli("core.run", "objective=sfd-v", "teacher=sdxl", f"teacher.path={sdxl_dir}", "data=prompts",
        f"data.path={prompts}", f"out={out}", "objective.nfe=2", "objective.nfe_min=2", "objective.nfe_max=3",
        "objective.substeps=1", "objective.sigma_min=0.03", "objective.lr=0.01", *FAST)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r.get("nfe") for r in records if "nfe" in r} <= {2, 3}
    npz = tmp_path / "s.npz"
    cli("core.sample", f"run={out}", "prompt=a red cube", "num=2", "seed=5", f"out={npz}", "device=cpu")
    import numpy as np
    from diffusers import DiffusionPipeline

    ours = torch.from_numpy(np.load(npz)["samples"]) / 2 + 0.5
    record = json.loads((out / "export" / "fewstep_sampling.json").read_text())
    assert record["options"]["model_kwargs"] == {"nfe": 2}
    theirs, pipe = exported_images(out / "export", ["a red cube"] * 2, seed=5)
    assert float((theirs - ours).abs().max()) <= 1e-3
    teacher = DiffusionPipeline.from_pretrained(sdxl_dir)  # training moved the exported UNet off the teacher
    assert any(not torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(),
                                                    teacher.unet.state_dict().values()))
