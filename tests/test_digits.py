"""Real digits: the data split, the exact empirical teacher, the pixel UNet, the digits FID, image sampling
and bad input. References are computed independently (numpy / scipy / sklearn directly)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("sklearn")
pytest.importorskip("diffusers")

from sklearn.datasets import load_digits  # noqa: E402

from core.cli import guard  # noqa: E402
from core.run import main as run_main  # noqa: E402
from core.sample import main as sample_main  # noqa: E402
from plugins.digits import data as digits
from plugins.digits import fid as digits_metrics  # noqa: E402

from conftest import run_config, train  # noqa: E402

TINY_UNET = ["student=unet", "student.channels=[8,16]", "student.head_dim=8"]
QUIET = ["train.progress=false", "train.eval_every=0", "train.preview_every=0"]


@pytest.fixture(scope="module", autouse=True)
def _classifier_cache(digits_classifier_cache):
    """Before any module fixture that scores samples (conftest.digits_classifier_cache)."""


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
    """A tiny unet denoise run on digits (a few steps: structure, not quality)."""
    out = str(tmp_path_factory.mktemp("digits") / "teacher")
    train("objective=denoise", "data=digits", *TINY_UNET, "train.steps=4", "train.batch=16", *QUIET, f"out={out}")
    return out


# -- data --------------------------------------------------------------------------------------------
def test_split_is_fixed_disjoint_stratified_and_covers_the_dataset():
    train_idx, held = digits.split_indices("train"), digits.split_indices("held-out")
    assert torch.equal(train_idx, digits.split_indices("train"))
    assert len(set(train_idx.tolist()) & set(held.tolist())) == 0
    assert sorted(train_idx.tolist() + held.tolist()) == list(range(1797))
    target = load_digits().target
    assert np.bincount(target[held.numpy()]).tolist() == [digits.HELD_OUT_PER_CLASS] * 10


def test_pixels_map_0_16_to_minus1_1_and_upsample_bilinearly():
    raw = load_digits()
    x, y = digits.load_split("train", 8)
    idx = digits.split_indices("train").numpy()
    np.testing.assert_allclose(x[:, 0].numpy(), raw.images[idx] / 8 - 1, atol=1e-6)
    assert y.tolist() == raw.target[idx].tolist()
    # bilinear x2 with half-pixel centres: output 2k = 3/4 x_k + 1/4 x_{k-1}, 2k+1 = 3/4 x_k + 1/4 x_{k+1}
    img = raw.images[idx[0]] / 8 - 1
    pad = np.pad(img, 1, mode="edge")
    rows = np.empty((16, 8))
    rows[0::2] = 0.75 * pad[1:-1, 1:-1] + 0.25 * pad[:-2, 1:-1]
    rows[1::2] = 0.75 * pad[1:-1, 1:-1] + 0.25 * pad[2:, 1:-1]
    rpad = np.pad(rows, ((0, 0), (1, 1)), mode="edge")
    ref = np.empty((16, 16))
    ref[:, 0::2] = 0.75 * rpad[:, 1:-1] + 0.25 * rpad[:, :-2]
    ref[:, 1::2] = 0.75 * rpad[:, 1:-1] + 0.25 * rpad[:, 2:]
    np.testing.assert_allclose(digits.load_split("train", 16)[0][0, 0].numpy(), ref, atol=1e-5)


def test_dataset_draws_train_rows_with_labels():
    cfg = run_config("objective=denoise", "data=digits", "data.size=16", *TINY_UNET)
    assert cfg.teacher.name == "digits"  # data=digits picks its own teacher
    teacher = digits.DigitsTeacher(cfg.teacher.config)
    ds = digits.DigitsData(cfg.data.config, teacher)
    batch = ds.sample(32)
    assert batch["x"].shape == (32, 1, 16, 16) and teacher.data_shape == (1, 16, 16)
    x_all, y_all = digits.load_split("train", 16)
    for x, c in zip(batch["x"], batch["cond"]):
        match = (x_all - x).flatten(1).abs().amax(1) == 0
        assert match.any() and y_all[match][0] == c


# -- teacher=digits: exact denoiser of the empirical distribution ------------------------------------------
def _bound_teacher(size=8):
    t = digits.DigitsTeacher(run_config("objective=denoise", "data=digits", *TINY_UNET).teacher.config)
    digits.DigitsData(digits.DigitsDataConfig(size=size), t)
    return t


def test_empirical_teacher_matches_a_float64_softmax_reference():
    t = _bound_teacher()
    y = t.images.double().flatten(1).numpy()
    labels = t.labels.numpy()
    gen = torch.Generator().manual_seed(1)
    x_t = torch.randn(6, 1, 8, 8, generator=gen, dtype=torch.float64) * 2
    sig = torch.tensor([0.3, 1.0, 3.0, 0.5, 2.0, 10.0], dtype=torch.float64)
    cond = torch.tensor([0, 1, 2, -1, 5, 9])

    def reference(i, cls):
        d = ((x_t[i].flatten().numpy()[None] - y) ** 2).sum(1) / (2 * sig[i].item() ** 2)
        keep = np.ones(len(y), bool) if cls < 0 else labels == cls
        w = np.exp(-(d[keep] - d[keep].min()))
        return (w[:, None] * y[keep]).sum(0) / w.sum()

    out = t.denoise(x_t, sig, cond).flatten(1).numpy()
    for i in range(6):
        np.testing.assert_allclose(out[i], reference(i, int(cond[i])), atol=1e-8)
    guided = t.denoise(x_t, sig, cond, guidance=3.0).flatten(1).numpy()
    for i in range(6):
        if cond[i] >= 0:
            u, c = reference(i, -1), reference(i, int(cond[i]))
            np.testing.assert_allclose(guided[i], u + 3.0 * (c - u), atol=1e-8)


def test_unbound_digits_teacher_serves_the_native_train_split():
    t = digits.DigitsTeacher(digits.DigitsTeacherConfig())
    assert t.data_shape == (1, 8, 8) and len(t.labels) == 1497


# -- student=unet --------------------------------------------------------------------------------------
def test_unet_preconditioning_cfg_and_null_label():
    from core.networks import guided

    cfg = run_config("objective=denoise", "data=digits", *TINY_UNET)
    teacher = _bound_teacher()
    from plugins.unet import unet_student

    net = unet_student(cfg.student.config, teacher).eval()
    x = torch.randn(4, 1, 8, 8)
    labels = torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        # EDM: c_skip -> 1 and c_out -> 0 as sigma -> 0, so D(x) -> x
        tiny = torch.full((4,), 1e-6)
        torch.testing.assert_close(net.denoise(x, tiny, labels), x, atol=1e-5, rtol=0)
        t = torch.full((4,), 2.0)
        null = net.denoise(x, t, torch.full((4,), -1))
        torch.testing.assert_close(net.denoise(x, t, None), null)
        cond = net.denoise(x, t, labels)
        torch.testing.assert_close(net.denoise(x, t, labels, guidance=2.5), null + 2.5 * (cond - null),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(guided(net, x, t, labels, 2.5), null + 2.5 * (cond - null), atol=1e-5, rtol=1e-5)
        zero = torch.zeros(4, net.backbone.emb_width)
        torch.testing.assert_close(net.denoise(x, t, labels, extra_emb=zero), cond)
        assert not torch.allclose(net.denoise(x, t, labels, extra_emb=zero + 1), cond)
    assert net.denoise(x, t, labels).shape == x.shape


# -- digits FID --------------------------------------------------------------------------------------
def test_frechet_distance_matches_scipy_sqrtm():
    from scipy import linalg

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(300, 6, generator=gen, dtype=torch.float64) * 2 + 1
    ca, cb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum().item() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert digits_metrics.frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert digits_metrics.frechet_distance(a, a) == pytest.approx(0, abs=1e-7)


def test_classifier_is_deterministic_cached_and_accurate(tmp_path):
    first = digits_metrics.train_classifier().state_dict()
    net = digits_metrics.classifier()  # trains again and caches
    assert os.path.exists(digits_metrics.cache_path())
    for k, v in net.state_dict().items():
        assert torch.equal(v, first[k]), k
    digits_metrics._CLASSIFIER = None
    for k, v in digits_metrics.classifier().state_dict().items():  # loaded from the cache
        assert torch.equal(v, first[k]), k
    x, y = digits.load_split("train", 8)
    assert (net(x).argmax(1) == y).double().mean() >= 0.9  # digits it never saw


def test_digits_report_real_vs_noise_and_class_metrics():
    held = digits_metrics.floor_report()
    x, y = digits.load_split("train", 16)
    real16 = digits_metrics.digits_report(x[:500], y[:500])
    noise = digits_metrics.digits_report(torch.rand(500, 1, 8, 8) * 2 - 1, y[:500])
    assert held["class_accuracy"] == 1.0 and held["min_class_share"] == pytest.approx(0.1)
    assert real16["class_accuracy"] >= 0.9 and real16["min_class_share"] >= 0.05
    assert noise["class_accuracy"] < 0.4
    assert noise["fid"] > 10 * max(held["fid"], real16["fid"])
    shuffled = digits_metrics.digits_report(x[:500], y[:500].roll(1))
    assert shuffled["class_accuracy"] < 0.3 and shuffled["fid"] == pytest.approx(real16["fid"])



def test_class_spread_is_1_for_real_digits_and_0_for_one_image_per_class():
    x, y = digits.load_split("train", 8)
    some = torch.tensor([0, 5, 17, 40])
    xc = x[y == 3][some].flatten(1).double()
    pairs = [float((xc[i] - xc[j]).norm()) for i in range(4) for j in range(4) if i != j]
    assert digits_metrics.within_class_distance(x[y == 3][some], torch.full((4,), 3))[3] == pytest.approx(
        sum(pairs) / len(pairs), rel=1e-12)
    assert digits_metrics.class_spread(x, y) == pytest.approx(1.0, abs=1e-12)
    held_x, held_y = digits.load_split("held-out", 8)
    assert 0.85 < digits_metrics.class_spread(held_x, held_y) < 1.15  # same law, other images
    first = torch.stack([x[y == c][0] for c in range(10)])
    collapsed = first.repeat_interleave(20, 0)  # one image per class, whatever the noise
    labels = torch.arange(10).repeat_interleave(20)
    assert digits_metrics.class_spread(collapsed, labels) == 0.0
    report = digits_metrics.digits_report(collapsed, labels)
    assert report["class_accuracy"] >= 0.9 and report["class_spread"] == 0.0  # right class, no variety

# -- runs, sampling, pictures ----------------------------------------------------------------------------
def test_student_copy_and_fake_score_with_gan_from_a_unet_checkpoint(unet_run, tmp_path):
    out = str(tmp_path / "dmd2")
    result = train("objective=dmd2", "teacher=checkpoint", f"teacher.path={unet_run}", "data=digits",
                   "train.steps=2", "train.batch=4", *QUIET, f"out={out}")
    trainer = result["trainer"]
    assert trainer.cfg.student.name == "copy" and trainer.cfg.critic.name == "fake-score"
    assert "gan_head" in trainer.nets  # the GAN head reads the UNet's mid block on real digits
    teacher_net = trainer.teacher.net
    for (k, v), (_, w) in zip(teacher_net.state_dict().items(), trainer.nets["critic"].state_dict().items()):
        assert v.shape == w.shape, k


def test_sample_writes_labelled_images_and_a_class_grid(unet_run, tmp_path):
    npz = tmp_path / "s.npz"
    assert sample_main([f"run={unet_run}", "num=12", "steps=2", f"out={npz}", "label=3", "guidance=2"]) == 0
    data = np.load(npz)
    assert data["samples"].shape == (12, 1, 8, 8) and (data["labels"] == 3).all()
    assert data["samples"].min() >= -1 and data["samples"].max() <= 1
    png = tmp_path / "grid.png"
    assert sample_main([f"run={unet_run}", "num=30", "steps=2", f"out={png}"]) == 0
    img = Image.open(png)
    assert img.size[1] == 10 * (8 * 4 + 2)  # one row per class, 8 pixels enlarged 4x, 2 px gap


def test_class_grid_places_each_image_in_its_class_row():
    from core.preview import class_grid_png

    images = torch.linspace(-1, 1, 6).view(6, 1, 1, 1).expand(6, 1, 2, 2)
    labels = torch.tensor([2, 0, 2, 1, 0, 1])
    img = np.asarray(Image.open(io.BytesIO(class_grid_png(images, labels, per_row=3, scale=1))).convert("L"))
    expected = ((images[:, 0, 0, 0] + 1) * 127.5).round().to(torch.uint8)
    for row, cls in enumerate([0, 1, 2]):
        members = (labels == cls).nonzero().squeeze(1).tolist()
        for col, i in enumerate(members):
            assert img[row * 4, 24 + col * 4] == expected[i]


BAD = [
    (["objective=denoise", "data=digits", "data.size=12"], "data.size: must be one of 8, 16, 32"),
    (["objective=denoise", "teacher=gmm", "student=unet"], "student=unet is for image data"),
    (["objective=denoise", "data=digits", *TINY_UNET, "data.size=16", "train.steps=4", "train.batch=16", *QUIET],
     "data.size: 8 -> 16"),  # resuming the 8-pixel run with another size
]


@pytest.mark.parametrize("argv,message", BAD, ids=["size", "unet-on-vectors", "resume-other-size"])
def test_bad_run_input_is_one_line_exit_2_and_writes_nothing(argv, message, unet_run, tmp_path, capsys):
    out = unet_run if "train.steps=4" in argv else str(tmp_path / "new")
    before = sorted(os.walk(unet_run))
    assert run_main([*argv, f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fewstep: error: ") and message in err, err
    assert not os.path.exists(tmp_path / "new") and sorted(os.walk(unet_run)) == before


def test_bad_label_is_one_line_exit_2_and_writes_nothing(unet_run, tmp_path, capsys):
    assert sample_main([f"run={unet_run}", "num=4", "label=12", f"out={tmp_path / 's.npz'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "label=12" in err and "0..9" in err
    assert not list(tmp_path.iterdir())


def test_digits_fid_cli_scores_a_sample_file(unet_run, tmp_path, capsys):
    from core.metrics import main as metrics_main
    from plugins.digits.fid import main as fid_main

    fid_cli = guard(fid_main)
    npz = tmp_path / "s.npz"
    assert sample_main([f"run={unet_run}", "num=40", "steps=2", f"out={npz}"]) == 0
    data = np.load(npz)
    expected = digits_metrics.digits_report(torch.as_tensor(data["samples"]), torch.as_tensor(data["labels"]))
    capsys.readouterr()
    assert fid_cli([str(npz)]) == 0
    out = dict(kv.split("=") for kv in capsys.readouterr().out.split())
    assert float(out["digits_fid"]) == pytest.approx(expected["fid"], rel=1e-4)
    assert float(out["class_accuracy"]) == pytest.approx(expected["class_accuracy"], abs=1e-4)
    np.savez(tmp_path / "vec.npz", samples=np.zeros((10, 2), np.float32))
    assert fid_cli([str(tmp_path / "vec.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shape (N, 1, S, S)" in err
    # core.metrics knows no plugin: its --digits option is gone, with the usual one-line error
    assert metrics_main(["--digits", str(npz)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fewstep: error: ")
