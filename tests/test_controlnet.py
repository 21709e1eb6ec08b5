"""Sprint ControlNet: identity at initialisation, effect once trained, gradients only to the branch."""

from __future__ import annotations

import pytest
import torch
from conftest import LATENT_CHANNELS, TEXT_HIDDEN, tiny_transformer

from sana_sprint.models.controlnet import ControlledTrigFlow, SprintControlNet, controlled_F
from sana_sprint.models.wrapper import TrigFlowTransformer
from sana_sprint.sampling import consistency

B, L, HW = 2, 5, 8


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, LATENT_CHANNELS, HW, HW, generator=g)
    s = torch.tensor([0.3, 1.2])
    ehs = torch.randn(B, L, TEXT_HIDDEN, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 3:] = 0
    control = torch.randn(B, LATENT_CHANNELS, HW, HW, generator=g)
    return x, s, ehs, mask, control


def _perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("guidance_embeds", [True, False])
@pytest.mark.parametrize("qk_norm", ["rms_norm_across_heads", None])
def test_identity_at_init_then_effect(guidance_embeds, qk_norm):
    base = TrigFlowTransformer(tiny_transformer(guidance_embeds=guidance_embeds, qk_norm=qk_norm))
    net = SprintControlNet.from_base(base.transformer, num_blocks=7)
    assert net.num_blocks == 1  # capped at depth - 1 (tiny base has 2 blocks)
    model = ControlledTrigFlow(base, net)
    x, s, ehs, mask, control = _inputs()
    w = 4.5 if guidance_embeds else None
    with torch.no_grad():
        ref = base(x, s, ehs, mask, w)
        out = model(x, s, ehs, mask, w, control=control)
        assert torch.equal(out, ref)
        assert torch.equal(controlled_F(base, net, x, s, ehs, mask, w, control), ref)
        # Perturbing only before_proj still changes nothing: after_proj gates everything.
        _perturb(net.before_proj, 1)
        assert torch.equal(model(x, s, ehs, mask, w, control=control), ref)
        _perturb(net.after_proj, 2)
        out = model(x, s, ehs, mask, w, control=control)
        assert (out - ref).abs().max() > 1e-4
        # The output now depends on the control image, and scale 0 switches the branch off.
        other = model(x, s, ehs, mask, w, control=control.flip(-1))
        assert (other - out).abs().max() > 1e-5
        off = model(x, s, ehs, mask, w, control=control, conditioning_scale=0.0)
        assert torch.allclose(off, ref, atol=1e-6)
        # No control at all = the base exactly.
        assert torch.equal(model(x, s, ehs, mask, w), ref)


def test_samples_land_after_matching_base_block():
    """controlnet_block_samples[i] is added after base block i + 1 (diffusers' convention)."""
    base = TrigFlowTransformer(tiny_transformer(num_layers=4))
    net = SprintControlNet.from_base(base.transformer, num_blocks=2)
    _perturb(net.after_proj, 3)
    x, s, ehs, mask, control = _inputs()
    seen = {}
    hooks = [
        blk.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o.detach().clone()))
        for i, blk in enumerate(base.transformer.transformer_blocks)
    ]
    model = ControlledTrigFlow(base, net)
    with torch.no_grad():
        model(x, s, ehs, mask, 4.5)
        plain = dict(seen)
        model(x, s, ehs, mask, 4.5, control=control)
    for h in hooks:
        h.remove()
    # Block outputs (before the addition) agree for blocks 0 and 1; block 2 sees the sample added after block 1.
    assert torch.equal(seen[0], plain[0]) and torch.equal(seen[1], plain[1])
    assert not torch.allclose(seen[2], plain[2])


def test_copies_match_base_blocks_and_k_default():
    base = tiny_transformer(num_layers=9)
    net = SprintControlNet.from_base(base)
    assert net.num_blocks == 7
    for i, blk in enumerate(net.blocks):
        for (k, a), (_, b) in zip(blk.state_dict().items(), base.transformer_blocks[i].state_dict().items()):
            assert torch.equal(a, b), k
        assert blk is not base.transformer_blocks[i]


def test_gradients_reach_controlnet_only():
    base = TrigFlowTransformer(tiny_transformer(), logvar=True)
    net = SprintControlNet.from_base(base.transformer)
    _perturb(net.after_proj, 4)  # at zero init only after_proj would receive gradient
    model = ControlledTrigFlow(base, net)
    x, s, ehs, mask, control = _inputs()
    model(x, s, ehs, mask, 4.5, control=control).square().mean().backward()
    assert all(p.grad is None for p in base.transformer.parameters())
    assert all(not p.requires_grad for p in base.transformer.parameters())
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bind_makes_plain_samplers_work():
    base = TrigFlowTransformer(tiny_transformer())
    net = SprintControlNet.from_base(base.transformer)
    _perturb(net.after_proj, 5)
    model = ControlledTrigFlow(base, net)
    x, s, ehs, mask, control = _inputs()
    gens = [torch.Generator().manual_seed(i) for i in range(B)]

    def F_fn(xs, ss):
        return model(xs, ss, ehs, mask, 4.5)

    with torch.no_grad():
        with model.bind(control):
            bound = consistency(F_fn, x * 0.5, [1.5708, 1.0, 0.0], gens)
        gens = [torch.Generator().manual_seed(i) for i in range(B)]
        explicit = consistency(
            lambda xs, ss: model(xs, ss, ehs, mask, 4.5, control=control), x * 0.5, [1.5708, 1.0, 0.0], gens
        )
        gens = [torch.Generator().manual_seed(i) for i in range(B)]
        unbound = consistency(F_fn, x * 0.5, [1.5708, 1.0, 0.0], gens)
    assert torch.equal(bound, explicit)
    assert not torch.allclose(bound, unbound)
    # A single control image broadcasts over the batch.
    with torch.no_grad():
        one = model(x, s, ehs, mask, 4.5, control=control[:1])
        two = model(x, s, ehs, mask, 4.5, control=control[:1].expand(B, -1, -1, -1))
    assert torch.equal(one, two)


def test_jvp_through_controlled_model():
    """Forward-mode AD through base + ControlNet (both cross-attentions swapped) matches reverse mode."""
    base = TrigFlowTransformer(tiny_transformer().double())
    net = SprintControlNet.from_base(base.transformer)
    _perturb(net.after_proj, 6)
    net.double()
    model = ControlledTrigFlow(base, net)
    x, s, ehs, mask, control = (t.double() if t.is_floating_point() else t for t in _inputs())
    dx, ds = torch.randn_like(x), torch.ones(B, dtype=torch.float64)

    def F(a, b):
        return model(a, b, ehs, mask, 4.5, control=control)

    with torch.no_grad(), model.jvp_mode():  # the constant-weight rules of models/jvp.py (default)
        _, tangent = torch.func.jvp(F, (x, s), (dx, ds))
    with torch.no_grad(), model.jvp_mode(fast=False):
        _, plain = torch.func.jvp(F, (x, s), (dx, ds))
    # Reference: reverse-mode double-backward JVP (works with SDPA), a second implementation.
    with model.jvp_mode(fast=False):
        _, ref = torch.autograd.functional.jvp(F, (x, s), (dx, ds))
    assert torch.allclose(tangent, ref, atol=1e-6, rtol=1e-6)
    assert torch.allclose(plain, ref, atol=1e-6, rtol=1e-6)
    # both branches' layers were swapped, and are restored
    assert any("forward" in m.__dict__ for m in net.modules()) is False
    # The branch takes part in the derivative.
    with torch.no_grad(), base.jvp_mode():
        _, plain = torch.func.jvp(lambda a, b: base(a, b, ehs, mask, 4.5), (x, s), (dx, ds))
    assert (plain - tangent).abs().max() > 1e-4


def test_save_load_roundtrip(tmp_path):
    base = TrigFlowTransformer(tiny_transformer())
    net = SprintControlNet.from_base(base.transformer)
    _perturb(net, 7)
    net.save_pretrained(tmp_path / "cn")
    loaded = SprintControlNet.from_pretrained(tmp_path / "cn", base=base.transformer)
    x, s, ehs, mask, control = _inputs()
    with torch.no_grad():
        a = ControlledTrigFlow(base, net)(x, s, ehs, mask, 4.5, control=control)
        b = ControlledTrigFlow(base, loaded)(x, s, ehs, mask, 4.5, control=control)
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        loaded.check_base(tiny_transformer(num_attention_heads=4, num_cross_attention_heads=4, cross_attention_dim=32))


def test_per_sample_conditioning_scale_equals_running_each_sample_alone():
    """A 1-D scale gives each sample its own strength: 0 = the base alone, 1 = full control; it is repeated
    like the control latents when CFG stacks the batch (2B)."""
    base = TrigFlowTransformer(tiny_transformer().double())
    net = SprintControlNet.from_base(base.transformer).double()
    _perturb(net.after_proj, 7)
    model = ControlledTrigFlow(base, net)
    x, s, ehs, mask, control = (t.double() if t.is_floating_point() else t for t in _inputs(3))
    with torch.no_grad():
        ref_on = model(x, s, ehs, mask, 4.5, control=control)
        ref_half = model(x, s, ehs, mask, 4.5, control=control, conditioning_scale=0.5)
        ref_off = base(x, s, ehs, mask, 4.5)
        assert (ref_on - ref_off).abs().max() > 1e-3
        with model.bind(control, torch.tensor([0.0, 1.0], dtype=torch.float64)):
            mixed = model(x, s, ehs, mask, 4.5)
        torch.testing.assert_close(mixed[0], ref_off[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(mixed[1], ref_on[1], rtol=0, atol=1e-12)
        mixed = model(x, s, ehs, mask, 4.5, control=control, conditioning_scale=torch.tensor([0.5, 0.0]))
        torch.testing.assert_close(mixed[0], ref_half[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(mixed[1], ref_off[1], rtol=0, atol=1e-12)
        # CFG-stacked batch [cond; uncond]: sample i's scale applies to both of its rows
        x2, s2 = torch.cat([x, x]), torch.cat([s, s])
        e2, m2 = torch.cat([ehs, ehs.flip(1)]), torch.cat([mask, mask])
        with model.bind(control, torch.tensor([1.0, 0.0], dtype=torch.float64)):
            stacked = model(x2, s2, e2, m2, 4.5)
        full = model(x2, s2, e2, m2, 4.5, control=control)
        off = base(x2, s2, e2, m2, 4.5)
        torch.testing.assert_close(stacked[[0, 2]], full[[0, 2]], rtol=0, atol=1e-12)
        torch.testing.assert_close(stacked[[1, 3]], off[[1, 3]], rtol=0, atol=1e-12)


def test_default_scale_per_step_count_from_the_folder(tmp_path):
    base = TrigFlowTransformer(tiny_transformer())
    net = SprintControlNet.from_base(base.transformer)
    assert net.default_scale(1) == 1.0  # nothing stored
    net.save_pretrained(tmp_path / "a", extra={"conditioning_scale": 0.7})
    net.save_pretrained(tmp_path / "b", extra={"conditioning_scale": 0.7, "default_conditioning_scale": {"1": 1.3, "4": 1.5}})
    a = SprintControlNet.from_pretrained(tmp_path / "a")
    b = SprintControlNet.from_pretrained(tmp_path / "b")
    assert a.default_scale(1) == 0.7
    assert (b.default_scale(1), b.default_scale(4), b.default_scale(2)) == (1.3, 1.5, 0.7)


def test_record_default_scales_merges_step_counts_and_refuses_other_tuning_settings(tmp_path):
    from sana_sprint.errors import UserError

    net = SprintControlNet.from_base(TrigFlowTransformer(tiny_transformer()).transformer)
    net.save_pretrained(tmp_path, extra={"conditioning_scale": 0.7, "condition": "scribble"})
    settings = {"tune_eval_seed": 7, "seed": 1, "num": 300, "tie": 0.005}
    first = {**settings, "steps": {"1": {"chosen": 1.3}, "4": {"chosen": 1.5}}, "note": "first run"}
    assert SprintControlNet.record_default_scales(tmp_path, first) == {"1": 1.3, "4": 1.5}
    # a later run of one more step count keeps the others (and the first run's note); a re-measured one is replaced
    second = {**settings, "steps": {"3": {"chosen": 1.2}, "1": {"chosen": 1.1}}}
    assert SprintControlNet.record_default_scales(tmp_path, second) == {"1": 1.1, "3": 1.2, "4": 1.5}
    loaded = SprintControlNet.from_pretrained(tmp_path)
    assert [loaded.default_scale(s) for s in (1, 2, 3, 4)] == [1.1, 0.7, 1.2, 1.5]
    record = loaded.info["conditioning_scale_selection"]
    assert list(record["steps"]) == ["1", "3", "4"] and record["note"] == "first run"
    assert loaded.info["condition"] == "scribble"  # the rest of the metadata is untouched
    # other tuning settings: refused (dry run included), nothing written
    before = (tmp_path / "controlnet_config.json").read_text()
    other = {**settings, "seed": 2, "steps": {"2": {"chosen": 1.5}}}
    for dry in (True, False):
        with pytest.raises(UserError, match="seed 1 vs 2"):
            SprintControlNet.record_default_scales(tmp_path, other, dry_run=dry)
    assert (tmp_path / "controlnet_config.json").read_text() == before
    assert SprintControlNet.record_default_scales(tmp_path, {**settings, "steps": {"2": {"chosen": 1.4}}},
                                                  dry_run=True) == {"1": 1.1, "2": 1.4, "3": 1.2, "4": 1.5}
    assert (tmp_path / "controlnet_config.json").read_text() == before


def test_serve_engine_uses_the_controlnets_default_scale_unless_the_request_sets_one(tmp_path):
    import numpy as np

    from sana_sprint.serve.engine import Engine, Request

    class Pipe:  # records the scale bound while the pipeline runs
        config, kind, device, dtype = {"resolution": 16}, "student", torch.device("cpu"), torch.float32

        def __init__(self):
            self.model, self.vae, self.seen = base, None, []

        def __call__(self, prompt, **kw):
            self.seen.append(engine.controlled._bound.scale if engine.controlled._bound else None)
            return type("Out", (), {"images": [np.zeros((16, 16, 3))]})()

    base = TrigFlowTransformer(tiny_transformer())
    SprintControlNet.from_base(base.transformer).save_pretrained(
        tmp_path / "cn", extra={"default_conditioning_scale": {"1": 1.3, "2": 1.5}})
    net = SprintControlNet.from_pretrained(tmp_path / "cn", base=base.transformer)
    pipe = Pipe()
    engine = Engine(pipe, net)
    engine._control_latents = lambda scribble: torch.zeros(1, LATENT_CHANNELS, 2, 2)
    for req in (Request("x", steps=1, scribble=object()), Request("x", steps=2, scribble=object()),
                Request("x", steps=1, scribble=object(), conditioning_scale=0.4)):
        engine.generate(req)
    assert pipe.seen == [1.3, 1.5, 0.4]
