"""plugins.diffusers.networks.SharedBase on a tiny SDXL-like UNet2DConditionModel: the teacher is bit-identical to
the plain UNet, each adapter trains alone, and gradient checkpointing sees the adapter its forward saw."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from plugins.diffusers.shared import SharedBase  # noqa: E402

DTYPE = torch.bfloat16


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=24, attention_head_dim=(2, 4), norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32,
        transformer_layers_per_block=(1, 2)).eval()


def inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 4, 8, 8, generator=g).to(DTYPE), timestep=torch.tensor([500, 20]),
                encoder_hidden_states=torch.randn(batch, 5, 24, generator=g).to(DTYPE),
                added_cond_kwargs={"text_embeds": torch.randn(batch, 32, generator=g).to(DTYPE),
                                   "time_ids": torch.randn(batch, 6, generator=g).to(DTYPE)})


def perturb(shared, role, seed):
    """Nonzero adapter weights (B starts at 0), so the role's output differs from the teacher's."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in shared.adapter_parameters(role):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture
def pair():
    plain = tiny_unet().to(DTYPE)
    return plain, SharedBase(copy.deepcopy(plain).float(), rank=4, alpha=4)


def test_teacher_is_bit_identical_to_the_plain_unet(pair):
    plain, shared = pair
    x = inputs()
    with torch.no_grad():
        ref = plain(**x).sample
        assert torch.equal(shared("teacher", **x).sample, ref)
        assert torch.equal(shared("student", **x).sample, ref)  # B = 0 at init: every role equals the teacher
        perturb(shared, "student", 1)
        perturb(shared, "critic", 2)
        student, critic = shared("student", **x).sample, shared("critic", **x).sample
        assert torch.equal(shared("teacher", **x).sample, ref)
    assert not torch.equal(student, ref) and not torch.equal(critic, ref) and not torch.equal(student, critic)
    assert all(p.dtype == DTYPE for n, p in shared.unet.named_parameters() if "lora_" not in n)
    assert all(p.dtype == torch.float32 for r in ("student", "critic") for p in shared.adapter_parameters(r))


def test_autocast_skips_the_adapter_input_cast_and_changes_nothing(pair):
    """Under bf16 autocast the adapters' fp32 input cast is skipped (fewer casts) with bit-identical output and
    gradients; without autocast the cast is back (bf16 inputs meet fp32 adapter weights)."""
    _, shared = pair
    perturb(shared, "student", 1)
    x = inputs()

    def run(casting: bool):
        with torch.autocast("cpu", dtype=DTYPE), torch.profiler.profile() as prof:
            if casting:  # the comparison: peft's cast on, the same autocast forward (student is the home role)
                for layer in shared._adapted:
                    layer.cast_input_dtype_enabled = True
                shared._input_cast = True
                out = shared.unet(**x).sample
            else:
                out = shared("student", **x).sample
        out.float().square().sum().backward()
        grads = [p.grad.clone() for p in shared.adapter_parameters("student")]
        shared.unet.zero_grad(set_to_none=True)
        return out, grads, sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")

    fast, fast_grads, fast_casts = run(False)
    ref, ref_grads, ref_casts = run(True)
    assert torch.equal(fast, ref) and all(torch.equal(a, b) for a, b in zip(fast_grads, ref_grads))
    assert fast_casts < ref_casts
    with torch.no_grad():
        shared("student", **x)  # no autocast: the cast must be on again, else bf16 @ fp32 raises
    assert all(layer.cast_input_dtype_enabled for layer in shared._adapted)


@pytest.mark.parametrize("role", ["student", "critic"])
def test_gradients_reach_only_the_active_adapter(pair, role):
    _, shared = pair
    perturb(shared, "student", 1)
    perturb(shared, "critic", 2)
    shared.use(role)
    shared(role, **inputs()).sample.float().square().mean().backward()
    other = "critic" if role == "student" else "student"
    assert shared.adapter_parameters(role) and all(p.grad is not None for p in shared.adapter_parameters(role))
    assert sum(p.grad.abs().sum() for p in shared.adapter_parameters(role)) > 0
    assert all(p.grad is None for p in shared.adapter_parameters(other))
    assert all(p.grad is None for n, p in shared.unet.named_parameters() if "lora_" not in n)
    with torch.no_grad():  # the teacher takes no gradient at all
        assert not shared("teacher", **inputs()).sample.requires_grad


def test_checkpointed_backward_sees_the_forward_adapter(pair):
    """A DMD2 generator step: student forward (checkpointed), then teacher and critic forwards, then the
    backward, which re-runs the student's blocks; the gradients equal those of a step without the others."""
    _, shared = pair
    perturb(shared, "student", 1)
    perturb(shared, "critic", 2)
    shared.unet.enable_gradient_checkpointing()
    shared.unet.train()
    shared.use("student")

    def student_grads(interleave: bool):
        for p in shared.adapter_parameters("student"):
            p.grad = None
        out = shared("student", **inputs()).sample
        if interleave:
            with torch.no_grad():
                others = shared("teacher", **inputs(seed=3)).sample + shared("critic", **inputs(seed=4)).sample
            out = out + 0 * others
        out.float().square().mean().backward()
        return [p.grad.clone() for p in shared.adapter_parameters("student")]

    alone, interleaved = student_grads(False), student_grads(True)
    assert all(torch.equal(a, b) for a, b in zip(alone, interleaved))


def test_unknown_role_is_refused(pair):
    with pytest.raises(ValueError, match="unknown role"):
        pair[1]("generator", **inputs())


def layer_state(unet):
    """Every peft LoRA layer's switch flags and every adapter parameter's requires_grad."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(m.disable_adapters, list(m.active_adapters)) for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    return layers, [(n, p.requires_grad) for n, p in unet.named_parameters() if "lora_" in n]


@pytest.mark.parametrize("path", [["teacher"], ["critic"], ["critic", "student"], ["teacher", "critic"],
                                  ["critic", "teacher", "student"]])
def test_role_switch_leaves_the_state_diffusers_own_switch_leaves(pair, path):
    """SharedBase switches roles on peft's layers directly (diffusers' walk over every module was a third of the
    host time of an iteration); the reference is diffusers' own enable/disable/set_adapter on a twin."""
    _, shared = pair
    twin = SharedBase(copy.deepcopy(tiny_unet()).float(), rank=4, alpha=4).unet
    twin.enable_adapters()
    twin.set_adapter("student")
    assert layer_state(shared.unet) == layer_state(twin)
    for role in path:
        shared.use(role)
        if role == "teacher":
            twin.disable_adapters()
        else:
            twin.enable_adapters()
            twin.set_adapter(role)
        assert layer_state(shared.unet) == layer_state(twin)
        assert shared.unet.active_adapters() == twin.active_adapters()
