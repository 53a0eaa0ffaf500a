"""DMD2's GAN term (core/gan.py): the non-saturating losses in closed form, the critic's bottleneck features
read by a hook that stops the forward, the head sized from the feature shape, and the critic phase's
L_fake + lambda_D L_D under the batch's labels."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import run_config, train

from core import gan
from core.errors import UsageError
from core.protocols import Context
from core.schedules import make_schedule
from plugins.dmd2 import DMD2, DMD2Config

TINY = ("student.hidden=32", "student.depth=2", "student.emb_dim=16", "train.batch=32", "train.eval_every=0",
        "train.preview_every=0", "train.eval_samples=64", "train.log_every=5")


# -- the head and its losses -----------------------------------------------------------------------------------------------

def test_gan_losses_match_closed_forms():
    lf, lr = torch.randn(64, dtype=torch.float64) * 3, torch.randn(64, dtype=torch.float64) * 3
    sig = torch.sigmoid
    torch.testing.assert_close(gan.generator_loss(lf), (-torch.log(sig(lf))).mean())
    torch.testing.assert_close(gan.discriminator_loss(lf, lr),
                               (-torch.log(1 - sig(lf))).mean() + (-torch.log(sig(lr))).mean())
    zero = torch.zeros(5)
    assert float(gan.generator_loss(zero)) == pytest.approx(math.log(2))
    assert float(gan.discriminator_loss(zero, zero)) == pytest.approx(2 * math.log(2))


def test_feature_hook_reads_the_mlp_trunk_and_stops_there():
    from core.networks import DenoiserNet, ResidualMLP

    net = DenoiserNet(ResidualMLP(2, 32, 2, 16, num_classes=3), make_schedule("edm"), "edm", 0.5)
    obj = DMD2(DMD2Config())
    module = gan.find_module(net, obj._feature_module_name(object(), net))
    ran_out = []
    net.backbone.out[2].register_forward_hook(lambda *a: ran_out.append(1))
    x, t, c = torch.randn(5, 2), torch.full((5,), 3.0), torch.tensor([0, 1, 2, -1, 0])
    f = gan.critic_features(net, module, x, t, c)
    assert ran_out == []  # the rest of the forward was skipped
    # independent computation of the trunk: h = inp(c_in x) + emb, h += block(h + emb), LayerNorm(h)
    bb = net.backbone
    c_in = 1 / torch.sqrt(t**2 + 0.25)
    emb = bb.embed(torch.log(t) / 4, c)
    h = bb.inp(c_in[:, None] * x) + emb
    for block in bb.blocks:
        h = h + block(h + emb)
    torch.testing.assert_close(f, torch.nn.functional.layer_norm(h, (32,), bb.out[0].weight, bb.out[0].bias))
    with pytest.raises(UsageError, match="not in the critic"):
        gan.find_module(net, "backbone.nope")


@pytest.mark.parametrize("shape,strided,groups", [((48,), 0, 0), ((7, 48), 0, 0), ((64, 32, 32), 3, 32),
                                                  ((64, 8, 8), 1, 32), ((64, 4, 4), 0, 32), ((48, 8, 8), 1, 16)])
def test_gan_head_is_sized_from_the_feature_shape(shape, strided, groups):
    head = gan.GANHead(shape)
    # GroupNorm over 32 groups where the channels allow, else the largest divisor of 32 that divides them
    assert {m.num_groups for m in head.modules() if isinstance(m, torch.nn.GroupNorm)} == ({groups} if groups else set())
    logits = head(torch.randn(3, *shape))
    assert logits.shape == (3,)
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    # DMD2's layout: 4x4 stride-2 blocks down to 4x4, then one conv over the map and a 1x1 conv to the logit
    assert sum(m.stride == (2, 2) for m in convs) == strided
    if convs:
        assert convs[-1].kernel_size == (1, 1) and convs[-2].kernel_size == (min(shape[1], 4),) * 2


def test_gan_needs_data_when_forced_on(tmp_path):
    with pytest.raises(UsageError, match="gan=on needs real data"):
        train(*TINY, "train.steps=1", "data=none", "objective.gan=on", f"out={tmp_path}")


# -- the critic phase ----------------------------------------------------------------------------------------

def test_critic_phase_with_the_gan_is_fake_score_plus_weighted_discriminator_loss(tmp_path):
    """L_critic = L_fake + lambda_D L_D, both reported under their own names (lambda_D = objective.gan_disc_weight)."""
    from core.runner import Trainer

    tr = Trainer(run_config(*TINY, "train.steps=1", "objective.gan_disc_weight=0.3", f"out={tmp_path}"))
    tr.build()
    ctx = Context(tr.nets, tr.parallel.micro_batches(tr.networks.dataset, tr.teacher)[0], 0, tr.micro, tr.device)
    loss, metrics = tr.objective.loss("critic", ctx)
    assert set(metrics) == {"fake", "gan"} and float(metrics["gan"]) > 0
    torch.testing.assert_close(loss.detach(), metrics["fake"] + 0.3 * metrics["gan"])


def test_critic_phase_discriminates_real_and_fake_under_the_batch_labels(tmp_path, monkeypatch):
    """A class-conditional critic's GAN features see each sample's own label, the real batch's and the fake's."""
    from core.runner import Trainer

    tr = Trainer(run_config(*TINY, "teacher.preset=cls4", "train.steps=1", f"out={tmp_path}"))
    tr.build()
    ctx = Context(tr.nets, tr.parallel.micro_batches(tr.networks.dataset, tr.teacher)[0], 0, tr.micro, tr.device)
    labels = ctx.batch["cond"]
    assert torch.is_tensor(labels) and labels.unique().numel() > 1
    seen = []
    critic_features = gan.critic_features
    monkeypatch.setattr(gan, "critic_features", lambda *a: seen.append(a[4]) or critic_features(*a))
    tr.objective.loss("critic", ctx)
    assert len(seen) == 1 and torch.equal(seen[0], torch.cat([labels, labels]))
    # real data in another dtype (float64 digits, a bf16 cache) meets the generator's samples in theirs
    ctx.batch = {**ctx.batch, "x": ctx.batch["x"].double()}
    loss, _ = tr.objective.loss("critic", ctx)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
