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

from tiny_pipelines import sd3_dir, sd15_dir, sdxl_dir  # noqa: E402,F401  (fixtures)

from core.registry import get_registry  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["train.steps=2", "train.batch=2", "train.eval_samples=2", "train.log_every=1", "train.ckpt_every=2",
        "train.eval_every=0", "train.preview_every=0", "train.progress=false", "train.device=cpu"]


def needs(objective: str):
    if objective not in get_registry().plugins["objective"]:
        pytest.skip(f"objective '{objective}' is not installed (plugin plugins/{objective}.py missing)")


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


def load_and_sample(export: str, family: str, steps: int) -> dict:
    extra = ", text_encoder_3=None, tokenizer_3=None" if family == "sd3" else ""
    call = ", max_sequence_length=16" if family == "sd3" else ""
    return plain_diffusers(f"""
        import json, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({export!r}{extra})
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(0)
        out = pipe(["a red cube", "a cat"], num_inference_steps={steps}, guidance_scale=0.0, generator=g,
                   height=16, width=16, output_type="pt"{call})
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
    k = meta["num_inference_steps"]
    result = load_and_sample(str(export), teacher, k)
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
