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
    with pytest.raises(UsageError, match=r"^GAN feature module 'backbone.nope' is not in the critic \(DenoiserNet\); "):
        gan.find_module(net, "backbone.nope")


class TupleBlock(torch.nn.Module):
    """Returns (features, skip connections), as UNet down blocks do."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 3)

    def forward(self, x):
        return self.linear(x), x


class TupleCritic(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.unused = TupleBlock(), torch.nn.Linear(2, 2)

    def denoise(self, x_t, t, cond=None):
        h, _ = self.block(x_t)
        return h[:, :2]


def test_feature_hook_takes_the_first_output_of_a_tuple_and_names_a_module_off_the_path():
    critic, x = TupleCritic(), torch.randn(4, 2)
    f = gan.critic_features(critic, critic.block, x, torch.ones(4))
    torch.testing.assert_close(f, x @ critic.block.linear.weight.T + critic.block.linear.bias)
    with pytest.raises(UsageError, match=r"^GAN feature module Linear did not run in the critic's forward; name a "
                                         r"module on the denoising path \(objective.gan_feature_module=NAME\)$"):
        gan.critic_features(critic, critic.unused, x, torch.ones(4))


def _conv_head_by_hand(head, f):
    """[4x4 stride-2 conv, GroupNorm, SiLU] per strided block, average-pooled to the window, then conv over the
    window, GroupNorm, SiLU, 1x1 conv to one logit per sample (DMD2's head), with the head's own weights."""
    F = torch.nn.functional
    layers = list(head.net)
    for conv, norm, _ in zip(*[iter(layers[:head.strided])] * 3):
        f = F.silu(F.group_norm(F.conv2d(f, conv.weight, conv.bias, stride=2, padding=1), norm.num_groups,
                                norm.weight, norm.bias))
    f = F.adaptive_avg_pool2d(f, head.window)
    conv, norm, _, out = layers[head.strided:]
    f = F.silu(F.group_norm(F.conv2d(f, conv.weight, conv.bias), norm.num_groups, norm.weight, norm.bias))
    return F.conv2d(f, out.weight, out.bias).flatten(1).mean(1)


@pytest.mark.parametrize("size", [(8, 8), (8, 12)], ids=["built-for", "another-aspect-ratio"])
def test_gan_heads_written_out(size):
    torch.manual_seed(0)
    head = gan.GANHead((16, 8, 8))
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(m.kernel_size, m.out_channels) for m in convs] == [((4, 4), 16), ((4, 4), 16), ((1, 1), 1)]
    f = torch.randn(3, 16, *size)
    torch.testing.assert_close(head(f), _conv_head_by_hand(head, f))
    vector = gan.GANHead((16,))  # Linear, SiLU, Linear; [tokens, C] features are averaged over the tokens first
    v = torch.randn(3, 16)
    first, last = vector.net[0], vector.net[2]
    expect = (torch.nn.functional.silu(v @ first.weight.T + first.bias) @ last.weight.T + last.bias).flatten()
    torch.testing.assert_close(vector(v), expect)
    torch.testing.assert_close(vector(v[:, None].expand(3, 5, 16)), expect)
    with pytest.raises(UsageError, match=r"^GAN head: cannot size a head for features of shape \(1, 2, 3, 4\); name a "
                                         r"module with \[C\], \[tokens, C\] or \[C, H, W\] outputs$"):
        gan.GANHead((1, 2, 3, 4))


@pytest.mark.parametrize("shape,strided,groups", [((48,), 0, 0), ((7, 48), 0, 0), ((64, 32, 32), 3, 32),
                                                  ((64, 8, 8), 1, 32), ((64, 4, 4), 0, 32), ((48, 8, 8), 1, 16)])
def test_gan_head_is_sized_from_the_feature_shape(shape, strided, groups):
    head = gan.GANHead(shape)
    # GroupNorm over 32 groups where the channels allow, else the largest divisor of 32 that divides them
    norms = {m.num_groups for m in head.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert norms == ({groups} if groups else set())
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
