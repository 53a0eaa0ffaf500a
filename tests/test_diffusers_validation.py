"""``callbacks=[validation]``: fixed validation prompts x seeds sampled during training into kept
``previews/step-XXXXXX.png`` grids (one row per prompt, one column per seed); the last grid equals what the
saved student generates for the same prompts and seeds."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from tiny_pipelines import sd15_dir  # noqa: E402,F401  (fixture)

FAST = ["train.steps=2", "train.batch=2", "train.eval_samples=2", "train.log_every=1", "train.ckpt_every=2",
        "train.eval_every=0", "train.preview_every=1", "train.progress=false", "train.device=cpu"]


def test_validation_grids_are_kept_and_reproduce_the_student(sd15_dir, tmp_path, monkeypatch):
    from PIL import Image

    from conftest import train
    from core.generation import generate
    from core.rundir import load_run

    monkeypatch.setenv("FEWSTEP_TENSORBOARD", "0")
    (tmp_path / "train.txt").write_text("a red cube\na photo of a cat\n")
    (tmp_path / "val.txt").write_text("a blue ball\nthe sea\nred\n")
    out = tmp_path / "run"
    train("objective=dmd2", "teacher=sd15", f"teacher.path={sd15_dir}", "data=prompts",
          f"data.path={tmp_path / 'train.txt'}", f"out={out}", "objective.steps=2", "objective.lr=0.01", "objective.critic_updates=1",
          "callbacks=[validation]", f"train.validation_prompts={tmp_path / 'val.txt'}", "train.validation_seeds=2",
          "seed=7", *FAST)
    grids = sorted(p.name for p in (out / "previews").iterdir())
    assert grids == ["step-000001.png", "step-000002.png"]  # every preview kept, none overwritten
    first, last = (np.asarray(Image.open(out / "previews" / g)).astype(int) for g in grids)
    assert first.shape == last.shape == (3 * 16, 2 * 16, 3)  # 3 prompts x 2 seeds of 16 px images
    assert np.abs(first - last).max() > 0  # the student moved between the grids

    networks, spec, _ = load_run(str(out), device="cpu")
    prompts = ["a blue ball", "the sea", "red"]
    for j, seed in enumerate((7, 8)):  # column j: seed train seed + j, for every prompt
        torch.manual_seed(seed)
        cond = networks.teacher.encode_condition(prompts)
        z = generate(networks.student, spec, 3, cond, None, "cpu", shape=networks.teacher.data_shape)
        img = ((networks.teacher.to_data_space(z).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        for i in range(3):
            cell = last[16 * i:16 * (i + 1), 16 * j:16 * (j + 1)]
            assert np.abs(cell - img[i].permute(1, 2, 0).numpy().astype(int)).max() <= 1


def test_validation_without_prompts_is_one_line(sd15_dir, tmp_path, capsys, monkeypatch):
    from core.run import main

    monkeypatch.setenv("FEWSTEP_TENSORBOARD", "0")
    (tmp_path / "p.txt").write_text("a cat\n")
    rc = main(["objective=dmd2", "teacher=sd15", f"teacher.path={sd15_dir}", "data=prompts",
               f"data.path={tmp_path / 'p.txt'}", f"out={tmp_path / 'run'}", "callbacks=[validation]", *FAST])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "train.validation_prompts" in lines[-1], lines


def test_validation_grids_go_to_tensorboard(sd15_dir, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import train

    monkeypatch.setenv("FEWSTEP_TENSORBOARD", "1")
    (tmp_path / "train.txt").write_text("a red cube\n")
    out = tmp_path / "run"
    train("objective=dmd2", "teacher=sd15", f"teacher.path={sd15_dir}", "data=prompts",
          f"data.path={tmp_path / 'train.txt'}", f"out={out}", "objective.steps=1", "callbacks=[validation]",
          "train.validation_prompts=[a cat, the sea]", "train.validation_seeds=3", *FAST)
    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0}).Reload()
    images = events.Images("validation")
    assert [e.step for e in images] == [1, 2] and (images[-1].height, images[-1].width) == (2 * 16, 3 * 16)
