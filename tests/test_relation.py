"""The teacher's relation contrast loss (losses/relation.py) and its wiring into train-teacher."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import IMAGE_SIZE

from sana_sprint.data.latents import LatentDataset, build_latent_cache
from sana_sprint.data.shapes import relation_phrases, swap_relation
from sana_sprint.losses.relation import relation_contrast_loss
from sana_sprint.training.config import ConfigError, TeacherConfig
from sana_sprint.training.teacher import TeacherMethod
from sana_sprint.training.trainer import Trainer, seed_everything


def _toy_velocity(w: torch.Tensor):
    """v = w[0] x_t + w[1] t + w[2] * (caption-dependent offset): a differentiable stand-in for the model."""

    def v(x_t, t, embeds, mask):
        cap = (embeds * mask[..., None]).sum(1).mean(1) / mask.sum(1)
        return w[0] * x_t + w[1] * t[:, None, None, None] + w[2] * cap[:, None, None, None]

    return v


def _inputs(dtype=torch.float64, b=5):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 2, 3, 3, generator=g, dtype=dtype)
    e, e2 = torch.randn(2, b, 4, 6, generator=g, dtype=dtype)
    m = torch.ones(b, 4, dtype=torch.long)
    m[:, 3] = 0
    t = torch.rand(b, generator=g, dtype=dtype)
    eps = torch.randn(b, 2, 3, 3, generator=g, dtype=dtype)
    return x, e, m, e2, m.clone(), t, eps


def test_loss_equals_float64_reference_and_its_gradient():
    x, e, m, e2, m2, t, eps = _inputs()
    w = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64, requires_grad=True)
    T = 0.05
    loss, terms = relation_contrast_loss(_toy_velocity(w), x, e, m, e2, m2, t, eps, T)
    # reference, written out: x_t = (1-t) x + t eps, target eps - x
    tt = t[:, None, None, None]
    x_t, target = (1 - tt) * x + tt * eps, eps - x
    err = ((_toy_velocity(w)(x_t, t, e, m) - target) ** 2).flatten(1).mean(1)
    err2 = ((_toy_velocity(w)(x_t, t, e2, m2) - target) ** 2).flatten(1).mean(1)
    ref = T * torch.log1p(torch.exp((err - err2) / T))
    assert loss.dtype == torch.float64 and torch.allclose(loss, ref, rtol=1e-12, atol=0)
    assert terms["rel_gap"].item() == pytest.approx((err2 - err).mean().item(), rel=1e-12)
    assert terms["rel_win"].item() == pytest.approx((err < err2).double().mean().item())
    # d loss / d w by central finite differences
    (grad,) = torch.autograd.grad(loss.sum(), w)
    h = 1e-6
    for k in range(3):
        d = torch.zeros(3, dtype=torch.float64)
        d[k] = h
        with torch.no_grad():
            up = relation_contrast_loss(_toy_velocity(w + d), x, e, m, e2, m2, t, eps, T)[0].sum()
            dn = relation_contrast_loss(_toy_velocity(w - d), x, e, m, e2, m2, t, eps, T)[0].sum()
        assert grad[k].item() == pytest.approx(((up - dn) / (2 * h)).item(), rel=1e-6, abs=1e-9)


def test_small_temperature_is_the_hinge_and_equal_captions_give_T_log2():
    x, e, m, e2, m2, t, eps = _inputs()
    w = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
    v = _toy_velocity(w)
    hinge, _ = relation_contrast_loss(v, x, e, m, e2, m2, t, eps, 1e-9)
    wide, _ = relation_contrast_loss(v, x, e, m, e2, m2, t, eps, 1.0)
    tt = t[:, None, None, None]
    x_t, target = (1 - tt) * x + tt * eps, eps - x
    gap = ((v(x_t, t, e, m) - target) ** 2).flatten(1).mean(1) - ((v(x_t, t, e2, m2) - target) ** 2).flatten(1).mean(1)
    assert torch.allclose(hinge, F.relu(gap), atol=1e-8) and (gap > 0).any() and (gap < 0).any()
    same, terms = relation_contrast_loss(v, x, e, m, e, m, t, eps, 0.02)  # the caption cannot be told apart
    assert torch.allclose(same, torch.full_like(same, 0.02 * torch.log(torch.tensor(2.0)).item()))
    assert terms["rel_gap"] == 0 and terms["rel_win"] == 0
    with pytest.raises(ValueError, match="temperature"):
        relation_contrast_loss(v, x, e, m, e2, m2, t, eps, 0.0)


def test_relation_phrases_and_swap():
    assert relation_phrases("a red circle to the left of a blue square") == ["to the left of"]
    assert swap_relation("two squares below a circle") == "two squares above a circle"
    assert swap_relation(swap_relation("a circle right of a square")) == "a circle right of a square"
    assert relation_phrases("a red circle and a blue square") == []
    with pytest.raises(ValueError):
        swap_relation("a circle above a square below a triangle")


@pytest.fixture
def position_cache(tmp_path, vae, text_encoder):
    return build_latent_cache("shapes:position=30", vae, text_encoder, 12, tmp_path / "cache", batch=6, size=IMAGE_SIZE,
                              progress=False)


def _cfg(tmp_path, text_encoder, **kw):
    base = dict(out=str(tmp_path / "run"), preset="tiny", model={}, steps=4, batch=6, lr=1e-3, warmup=0, log_every=1,
                ckpt_every=100, sample_every=100, progress=False, max_length=text_encoder.max_length, resolution=IMAGE_SIZE)
    return TeacherConfig.from_dict({**base, **kw})


def test_teacher_relation_table_and_logged_terms(tmp_path, position_cache, vae, text_encoder):
    torch.set_num_threads(1)
    data = LatentDataset(position_cache)
    cfg = _cfg(tmp_path, text_encoder, relation_weight=1.0, relation_rows=3)
    seed_everything(0)
    m = TeacherMethod(cfg, data, torch.device("cpu"), vae=vae, text_encoder=text_encoder)
    table = m.relation
    with_rel = [c for c in dict.fromkeys(data.captions) if len(relation_phrases(c)) == 1]
    assert with_rel and set(table.row) == set(with_rel)
    for c in with_rel[:3]:  # the stored embedding is the swapped caption's own encoding
        e, mk = text_encoder.encode([swap_relation(c)])
        assert torch.allclose(table.embeds[table.row[c]], e[0], atol=1e-6) and torch.equal(table.masks[table.row[c]], mk[0])
    Trainer(m, data.loader(cfg.batch, 0), cfg).fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(0 < r["rel_rows"] <= 3 and r["rel_loss"] > 0 and "rel_gap" in r for r in rows)


def test_relation_weight_changes_the_update_and_needs_relations(tmp_path, cache_plain, vae, text_encoder):
    data = LatentDataset(cache_plain)
    no_rel = [c for c in data.captions if relation_phrases(c)]
    if not no_rel:  # a cache without position scenes: the option is refused with a clear error
        with pytest.raises(ConfigError, match="relation"):
            TeacherMethod(_cfg(tmp_path, text_encoder, relation_weight=1.0), data, torch.device("cpu"), vae=vae,
                          text_encoder=text_encoder)
    with pytest.raises(ConfigError, match="relation_temperature"):
        _cfg(tmp_path, text_encoder, relation_weight=1.0, relation_temperature=0.0)
    with pytest.raises(ConfigError, match="relation_weight"):
        _cfg(tmp_path, text_encoder, relation_weight=-1.0)


def test_one_step_with_and_without_the_relation_term(tmp_path, position_cache, vae, text_encoder):
    """Same draws for the flow loss: the relation term changes the parameters' update, weight 0 does not call it."""
    torch.set_num_threads(1)
    data = LatentDataset(position_cache)
    outs = {}
    for w in (0.0, 5.0):
        seed_everything(0)
        m = TeacherMethod(_cfg(tmp_path / str(w), text_encoder, relation_weight=w, steps=1), data, torch.device("cpu"),
                          vae=vae, text_encoder=text_encoder)
        Trainer(m, data.loader(6, 0), m.cfg).fit()
        outs[w] = torch.cat([p.detach().flatten() for p in m.transformer.parameters()])
        assert (m.relation is None) == (w == 0)
    assert not torch.allclose(outs[0.0], outs[5.0])


@pytest.fixture
def cache_plain(tmp_path, vae, text_encoder):
    return build_latent_cache("shapes:position=0,twin_position=0", vae, text_encoder, 6, tmp_path / "cache_plain",
                              batch=6, size=IMAGE_SIZE, progress=False)
