"""The conformance suite over the diffusers plugins, on tiny pipelines of the real architectures
(tests/tiny_pipelines.py: random weights, saved and loaded through ``from_pretrained``). These plugins need a
pipeline path, so the settings are given here the way a plugin declares them (``conformance_config`` on the
factory); test_conformance.py leaves them to this file and fails on any other skip."""

from __future__ import annotations

import pytest
import torch
from tiny_pipelines import sd3_dir, sd15_dir, sdxl_dir  # noqa: F401 (fixtures)

from core import testing
from core.registry import Registry

pytest.importorskip("diffusers")  # the diffusers extra is part of make setup; see test_diffusers_teacher.py

REGISTRY = Registry()
TEACHER = {"sd15": "sd15_dir", "sdxl": "sdxl_dir", "sd3": "sd3_dir", "flow": "sd3_dir"}

# (kind, name) -> CLI settings, given the pipeline dirs, a prompts file and an image folder
CASES = {
    ("teacher", "sd15"): lambda d: ["teacher=sd15", f"teacher.path={d['sd15']}", "data=prompts",
                                    f"data.path={d['prompts']}"],
    ("teacher", "sdxl"): lambda d: ["teacher=sdxl", f"teacher.path={d['sdxl']}", "data=prompts",
                                    f"data.path={d['prompts']}"],
    ("teacher", "sd3"): lambda d: ["teacher=sd3", f"teacher.path={d['sd3']}", "data=prompts",
                                   f"data.path={d['prompts']}"],
    ("teacher", "flow"): lambda d: ["teacher=flow", f"teacher.path={d['sd3']}", "data=prompts",
                                    f"data.path={d['prompts']}"],
    ("student", "diffusers"): lambda d: ["teacher=sd15", f"teacher.path={d['sd15']}", "data=prompts",
                                         f"data.path={d['prompts']}"],
    ("critic", "diffusers"): lambda d: ["teacher=sd15", f"teacher.path={d['sd15']}", "data=prompts",
                                        f"data.path={d['prompts']}"],
    ("dataset", "prompts"): lambda d: ["teacher=sd15", f"teacher.path={d['sd15']}", f"data.path={d['prompts']}"],
    ("dataset", "images"): lambda d: ["teacher=sd15", f"teacher.path={d['sd15']}", f"data.path={d['images']}"],
}

# student/critic=shared-lora put their adapters inside the teacher's own UNet: sharing it is the point, and the
# suite's rule "no parameter storage shared with the teacher" refuses exactly that. tests/test_shared_lora.py
# checks what the rule protects: the teacher's outputs stay bit-identical to a separately loaded teacher's
# whatever the adapters hold, and gradients reach only the adapter a phase trains, never the base.
SHARES_THE_TEACHER = {("student", "shared-lora"), ("critic", "shared-lora")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, request):
    from PIL import Image

    root = tmp_path_factory.mktemp("conformance-diffusers")
    prompts = root / "prompts.txt"
    prompts.write_text("a red square\na blue circle\ntwo green lines\na cat\n")
    images = root / "images"
    images.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        pixels = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"picture {i}")
    dirs = {name: request.getfixturevalue(f"{name}_dir") for name in ("sd15", "sdxl", "sd3")}
    return {**dirs, "prompts": str(prompts), "images": str(images)}


def test_every_diffusers_plugin_has_a_case():
    """A diffusers plugin added later must be added here (otherwise test_conformance.py fails on its skip)."""
    from_diffusers = {case for case in testing.cases(REGISTRY, dist="fewstep")
                      if REGISTRY.get(*case).plugin == "diffusers" and case[0] != "callback"}  # callbacks: there
    assert from_diffusers == set(CASES) | SHARES_THE_TEACHER


@pytest.mark.parametrize("kind,name", sorted(CASES), ids=[f"{k}-{n}" for k, n in sorted(CASES)])
def test_diffusers_plugin_conforms(kind, name, inputs, tmp_path, monkeypatch):
    factory = REGISTRY.get(kind, name).factory
    monkeypatch.setattr(factory, "conformance_config", lambda env: CASES[kind, name](inputs), raising=False)
    testing.check(kind, name, REGISTRY, tmp_path)
