"""``python -m core.evaluate``: FID and CLIP score of a text-to-image run through torchmetrics, with small
random-weight feature extractors given by path (a TorchScript CNN, a tiny transformers CLIP), checked against
the formulas computed here in float64 from the same features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("torchmetrics")

from tiny_pipelines import sd15_dir, tokenizer  # noqa: E402,F401  (fixtures)

FAST = ["train.steps=1", "train.batch=2", "train.eval_samples=2", "train.log_every=1", "train.ckpt_every=1",
        "train.eval_every=0", "train.preview_every=0", "train.progress=false", "train.device=cpu"]


@pytest.fixture(scope="module")
def run_dir(sd15_dir, tmp_path_factory):
    from conftest import train

    root = tmp_path_factory.mktemp("eval")
    (root / "prompts.txt").write_text("a red cube\na cat\nthe sea\n")  # short: a 16-token CLIP
    out = root / "run"
    train("objective=dmd2", "teacher=sd15", f"teacher.path={sd15_dir}", "data=prompts",
          f"data.path={root / 'prompts.txt'}", f"out={out}", "objective.steps=2", *FAST)
    return out


class TinyFeatures(torch.nn.Module):
    """A random conv net: images [N, 3, H, W] in [0, 1] -> 6 features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x * 2 - 1)).mean(dim=(2, 3)) * 10


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    root = tmp_path_factory.mktemp("metric-models")
    torch.jit.save(torch.jit.script(TinyFeatures()), str(root / "features.pt"))
    torch.manual_seed(0)
    text = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root / "clip")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                                 crop_size={"height": 16, "width": 16}),
                              tokenizer=tokenizer())
    processor.save_pretrained(root / "clip")
    refs = root / "reference"
    refs.mkdir()
    gen = torch.Generator().manual_seed(1)
    for i in range(7):
        arr = (torch.rand(20, 24, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(refs / f"r{i}.png")
    return root


def fid_float64(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), the trace of the root from the eigenvalues."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.sqrt(np.clip(np.linalg.eigvals(s_a @ s_b).real, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * root)


def test_fid_and_clip_score_match_the_formulas(run_dir, models, tmp_path, capsys):
    from transformers import CLIPModel, CLIPProcessor

    from core.evaluate import load_reference, main

    prompts = run_dir.parent / "prompts.txt"
    out, samples = tmp_path / "eval.json", tmp_path / "samples.npz"
    rc = main([f"run={run_dir}", f"prompts={prompts}", f"reference={models / 'reference'}",
               f"fid_model={models / 'features.pt'}", f"clip_model={models / 'clip'}", "num=8", "batch=3",
               f"out={out}", f"samples={samples}", "device=cpu"])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    saved = np.load(samples)
    images, used = torch.from_numpy(saved["images"]), list(saved["prompts"])
    assert images.shape == (8, 3, 16, 16) and used[:4] == ["a red cube", "a cat", "the sea",
                                                           "a red cube"]
    feats = TinyFeatures()
    with torch.no_grad():
        fake = feats(images).double().numpy()
        real = feats(load_reference(str(models / "reference"), (16, 16))).double().numpy()
    assert result["reference_images"] == 7
    assert result["fid"] == pytest.approx(fid_float64(real, fake), rel=1e-3, abs=1e-4)
    model, processor = CLIPModel.from_pretrained(models / "clip"), CLIPProcessor.from_pretrained(models / "clip")
    with torch.no_grad():
        inputs = processor(text=used, images=list((images * 255).round().to(torch.uint8)), return_tensors="pt",
                           padding=True)
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        img, txt = (getattr(v, "pooler_output", v) for v in (img, txt))
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    # torchmetrics floors the mean, not each sample (its CLIPScore.compute)
    assert result["clip_score"] == pytest.approx(max(float(100 * cos.mean()), 0.0), rel=1e-4, abs=1e-4)
    # the same seed gives the same images: evaluation numbers are reproducible
    rc = main([f"run={run_dir}", f"prompts={prompts}", f"clip_model={models / 'clip'}", "num=8", "batch=3",
               f"out={tmp_path / 'again.json'}", "device=cpu"])
    assert rc == 0 and json.loads((tmp_path / "again.json").read_text())["clip_score"] == result["clip_score"]


@pytest.mark.parametrize("args,message", [
    (["prompts=P"], "needs run="),
    (["run=R", "prompts=P"], "nothing to compute"),
    (["run=R", "prompts=P", "reference=F"], "also give fid_model"),
    (["run=R", "prompts=P", "fid_model=inception", "reference=F"], "needs fid_weights=FILE"),
    (["run=R", "prompts=P", "fid_model=/nowhere.pt", "reference=F"], "no such file"),
    (["run=R", "prompts=P", "fid_model=inception", "fid_weights=EVIL", "reference=F"], "never unpickles code"),
    (["run=R", "prompts=P", "clip_model=/nowhere"], "no such folder"),
    (["run=R", "prompts=P", "clip_model=C", "num=0"], "num must be > 0"),
    (["run=R", "prompts=P", "clip_model=C", "bogus=1"], "unknown key"),
])
def test_usage_errors_are_one_line(run_dir, models, tmp_path, capsys, args, message):
    from core.evaluate import main

    import pickle

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"weights": print}))  # loading it would call code
    subst = {"R": str(run_dir), "P": str(run_dir.parent / "prompts.txt"), "F": str(models / "reference"),
             "C": str(models / "clip"), "EVIL": str(tmp_path / "evil.pth")}
    argv = [a.split("=")[0] + "=" + subst.get(a.split("=", 1)[1], a.split("=", 1)[1]) for a in args]
    capsys.readouterr()
    assert main(argv + ["device=cpu"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fewstep: error:") and message in lines[0], lines


def test_without_torchmetrics_the_error_says_how_to_install(run_dir, models, monkeypatch, capsys):
    import sys

    from core.evaluate import main

    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    assert main([f"run={run_dir}", f"prompts={run_dir.parent / 'prompts.txt'}", f"clip_model={models / 'clip'}"]) == 2
    assert "pip install 'fewstep[diffusers]'" in capsys.readouterr().err
