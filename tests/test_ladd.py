"""LADD: hinge losses vs float64 hand computation, virtual BatchNorm, hook indices, gradient routing."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import LATENT_CHANNELS, MAX_LENGTH, TEXT_HIDDEN, tiny_transformer

from sana_sprint.losses import ladd
from sana_sprint.models import TrigFlowTransformer, make_student
from sana_sprint.models.discriminator import (
    Discriminator,
    DiscriminatorHead,
    VirtualBatchNorm1d,
    feature_blocks,
)

SD = 0.5

pytestmark = pytest.mark.usefixtures("one_thread")


def test_hinge_losses_match_hand_computation():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(3, 10, generator=g, dtype=torch.float64) * 2
    fake = torch.randn(5, 10, generator=g, dtype=torch.float64) * 2
    loss, r, f = ladd.hinge_d_loss(real, fake)
    r_ref = sum(max(0.0, 1.0 - v) for v in real.flatten().tolist()) / real.numel()
    f_ref = sum(max(0.0, 1.0 + v) for v in fake.flatten().tolist()) / fake.numel()
    assert r.item() == pytest.approx(r_ref, rel=1e-12)
    assert f.item() == pytest.approx(f_ref, rel=1e-12)
    assert loss.item() == pytest.approx(0.5 * (r_ref + f_ref), rel=1e-12)
    assert ladd.generator_adv_loss(fake).item() == pytest.approx(-sum(fake.flatten().tolist()) / fake.numel())
    # hinge saturates: confident logits give zero loss
    assert ladd.hinge_d_loss(torch.full((2, 3), 5.0), torch.full((2, 3), -5.0))[0].item() == 0.0


@pytest.mark.parametrize("batch", [1, 5, 8, 13, 16])
def test_virtual_batchnorm_equals_per_group_batchnorm(batch):
    torch.manual_seed(batch)
    bn = VirtualBatchNorm1d(6, virtual_batch=8).double()
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
    x = torch.randn(batch, 6, 7, dtype=torch.float64) * 3 + 1
    y = bn(x)
    for start in range(0, batch, 8):
        chunk = x[start : start + 8]
        ref = torch.nn.functional.batch_norm(chunk, None, None, bn.weight, bn.bias, training=True, eps=1e-5)
        torch.testing.assert_close(y[start : start + 8], ref)
    # groups are independent: changing group 2 leaves group 1 alone
    if batch > 8:
        x2 = x.clone()
        x2[8:] *= 10
        torch.testing.assert_close(bn(x2)[:8], y[:8])
    bn.eval()
    torch.testing.assert_close(bn(x), y)  # batch statistics in eval too (no running stats)


def test_feature_blocks():
    assert feature_blocks(20) == [2, 8, 14, 19]
    assert feature_blocks(28) == [3, 11, 19, 27]
    assert feature_blocks(8) == [1, 3, 5, 7]
    assert feature_blocks(2) == [0, 1]
    assert feature_blocks(1) == [0]
    for n in range(1, 40):
        idx = feature_blocks(n)
        assert idx == sorted(set(idx)) and idx[-1] == n - 1 and len(idx) == min(4, n) and idx[0] >= 0


def test_head_shapes_and_residual():
    head = DiscriminatorHead(16)
    for b in (1, 3, 9):
        assert head(torch.randn(b, 16, 12)).shape == (b, 12)


def _setup(b=3, seed=0):
    teacher = TrigFlowTransformer(tiny_transformer(guidance_embeds=False)).requires_grad_(False)
    student = TrigFlowTransformer(make_student(teacher.transformer), logvar=True)
    disc = Discriminator(teacher)
    g = torch.Generator().manual_seed(seed)
    x0 = SD * torch.randn(b, LATENT_CHANNELS, 8, 8, generator=g)
    ehs = torch.randn(b, MAX_LENGTH, TEXT_HIDDEN, generator=g)
    mask = torch.ones(b, MAX_LENGTH, dtype=torch.long)
    return teacher, student, disc, x0, ehs, mask


def test_hooks_read_the_chosen_blocks_and_only_during_forward():
    teacher, _, disc, x0, ehs, mask = _setup()
    assert disc.block_indices == [0, 1]
    seen = {}
    handles = [
        teacher.transformer.transformer_blocks[i].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o))
        for i in disc.block_indices
    ]
    s = torch.full((3,), 0.7)
    feats = disc.features(x0 / SD, s, ehs, mask)
    for f, i in zip(feats, disc.block_indices):
        torch.testing.assert_close(f, seen[i].transpose(1, 2))
    for h in handles:
        h.remove()
    teacher(x0 / SD, s, ehs, mask)  # a plain teacher call stores nothing
    assert disc._features is None
    # the teacher is not part of the discriminator's parameters / state
    assert all(k.startswith("heads.") for k in disc.state_dict())
    assert sum(p.numel() for p in disc.parameters()) == sum(p.numel() for p in disc.heads.parameters())


def test_generator_step_grads_reach_student_through_teacher_only():
    teacher, student, disc, x0, ehs, mask = _setup()
    disc.requires_grad_(False)
    w = torch.full((3,), 4.5)
    cfg = ladd.LADDConfig(max_time_prob=0.5)
    loss, logs = ladd.adversarial_g_loss(student, disc, x0, ehs, mask, w, cfg, torch.Generator().manual_seed(1))
    loss.backward()
    assert math.isfinite(logs["ladd/g_adv"])
    assert student.transformer.proj_out.weight.grad.abs().sum() > 0
    assert student.transformer.transformer_blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in disc.parameters())


def test_discriminator_step_grads_heads_only():
    teacher, student, disc, x0, ehs, mask = _setup(b=3)
    loss, logs = ladd.discriminator_loss(
        student, disc, x0, ehs, mask, torch.full((3,), 4.5), ladd.LADDConfig(), torch.Generator().manual_seed(2)
    )
    loss.backward()
    assert 0 <= logs["ladd/d_real"] and 0 <= logs["ladd/d_fake"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.heads[0].cls.parameters())
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("b", [1, 2])
def test_discriminator_step_any_batch_with_misaligned_pairs(b):
    _, student, disc, x0, ehs, mask = _setup(b=b)
    loss, _ = ladd.discriminator_loss(student, disc, x0, ehs, mask, torch.full((b,), 4.0),
                                      ladd.LADDConfig(misaligned_pairs=True), torch.Generator().manual_seed(3))
    assert torch.isfinite(loss)
    assert ladd.misaligned(x0) is None if b == 1 else torch.equal(ladd.misaligned(x0)[0], x0[-1])


def test_generator_time_uses_pi_over_2_itself():
    s = ladd.generator_time(4000, ladd.LADDConfig(max_time_prob=0.5), torch.Generator().manual_seed(0))
    frac = (s == torch.tensor(math.pi / 2, dtype=torch.float32)).float().mean().item()
    assert 0.45 < frac < 0.55
    assert s.max().item() == pytest.approx(math.pi / 2) and s.min() > 0
    assert (ladd.generator_time(100, ladd.LADDConfig(max_time_prob=0.0)) < math.pi / 2).all()
    assert (ladd.generator_time(100, ladd.LADDConfig(max_time_prob=1.0)) == math.pi / 2).all()
    s_d = ladd.discriminator_time(4000, ladd.LADDConfig(), torch.Generator().manual_seed(1))
    tau = torch.log(torch.tan(s_d) * SD)  # invert s = arctan(exp(tau) / sd)
    assert abs(tau.mean().item() + 0.6) < 0.1 and abs(tau.std().item() - 1.0) < 0.1
