"""CoOp: learned context in open_clip's text tower, and the cached class text features."""

from __future__ import annotations

import pytest
import torch

from vpt_robust.config import BackboneConfig, HeadConfig, PromptConfig
from vpt_robust.models import Backbone, load_backbone
from vpt_robust.models.classifier import build_classifier
from vpt_robust.prompts import CoOpContext

NAMES = ["cat", "dog", "bird"]
HEAD = HeadConfig(templates=["a photo of a {}."])


@pytest.fixture(scope="module")
def bb(micro_clip_name: str) -> Backbone:
    torch.manual_seed(0)
    return load_backbone(
        BackboneConfig(source="open_clip", name=micro_clip_name), torch.device("cpu")
    )


def test_text_tower_from_embeddings_equals_encode_text(bb: Backbone) -> None:
    tokens = bb.tokenize(["a photo of a cat.", "two dogs", "x"])
    with torch.no_grad():
        ref = bb.encode_text(tokens)
        ours = bb.encode_text_embeddings(bb.embed_tokens(tokens), tokens)
    assert torch.equal(ours, ref)


def test_context_from_init_text_is_the_zero_shot_prompt(bb: Backbone) -> None:
    x = torch.rand(4, 3, 32, 32)
    zero_shot = build_classifier(bb, NAMES, None, HEAD)
    coop = build_classifier(bb, NAMES, PromptConfig(kind="coop", init="a photo of a"), HEAD).eval()
    assert coop.head.context.n_ctx == 4 and coop.num_trainable() == 4 * bb.text_width
    with torch.no_grad():
        assert torch.allclose(coop(x), zero_shot(x), atol=1e-5)


def test_random_and_class_specific_contexts(bb: Backbone) -> None:
    torch.manual_seed(0)
    unified = CoOpContext(bb, NAMES, n_ctx=6, init="random")
    specific = CoOpContext(bb, NAMES, n_ctx=6, init="random", class_specific=True)
    assert unified.ctx.shape == (6, bb.text_width)
    assert specific.ctx.shape == (3, 6, bb.text_width)
    assert 0.01 < float(unified.ctx.detach().std()) < 0.04  # N(0, 0.02)
    assert (
        unified(bb).shape == specific(bb).shape == (3, bb.encode_text(bb.tokenize(["a"])).shape[1])
    )
    with pytest.raises(ValueError, match="length 16 with 16 context tokens"):
        CoOpContext(bb, NAMES, init="random")  # the default 16 does not fit a 16-token tower
    with pytest.raises(ValueError, match="differs from the 4 tokens"):
        CoOpContext(bb, NAMES, n_ctx=3, init="a photo of a")


def test_text_features_cached_in_eval_and_refreshed_after_a_step(bb: Backbone) -> None:
    model = build_classifier(bb, NAMES, PromptConfig(kind="coop", init="random", n_ctx=4), HEAD)
    calls = []
    context = model.head.context
    original = context.forward
    context.forward = lambda backbone: (calls.append(1), original(backbone))[1]
    x = torch.rand(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        first = model(x)
        model(x)
        model(x)
    assert len(calls) == 1  # computed once, then served from the cache
    model.train()
    opt = torch.optim.SGD(model.trainable_parameters(), lr=1.0)
    model(x).logsumexp(-1).sum().backward()
    assert context.ctx.grad is not None and context.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.parameters())
    opt.step()
    n = len(calls)
    model.eval()
    with torch.no_grad():
        after = model(x)
        model(x)
    assert len(calls) == n + 1  # the step changed the context: recomputed once
    assert not torch.allclose(first, after)
    model.load_learned_state({"head.context.ctx": torch.zeros_like(context.ctx)})
    with torch.no_grad():
        model(x)
    assert len(calls) == n + 2  # loading a context invalidates the cache too


def test_shared_context_transfers_to_new_classes_class_specific_does_not(bb: Backbone) -> None:
    trained = build_classifier(bb, NAMES, PromptConfig(kind="coop"), HEAD)
    novel = build_classifier(bb, ["fish", "frog"], PromptConfig(kind="coop"), HEAD)
    novel.load_learned_state(trained.learned_state())
    assert not trained.class_bound
    specific = build_classifier(bb, NAMES, PromptConfig(kind="coop", class_specific=True), HEAD)
    assert specific.class_bound
    with pytest.raises(ValueError, match="a linear head"):
        build_classifier(bb, NAMES, PromptConfig(kind="coop", head="linear"), HEAD)


def _coop(bb: Backbone):
    torch.manual_seed(0)
    return build_classifier(bb, NAMES, PromptConfig(kind="coop", init="random", n_ctx=4), HEAD)


def test_eval_mode_forward_under_grad_reaches_the_context(bb: Backbone) -> None:
    """Test-time tuning (TPT) tunes the context with the model in eval mode: grad mode, not
    ``training``, decides whether the text features carry a gradient."""
    model = _coop(bb).eval()
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32))  # fills the cache
    model(torch.rand(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    grad = model.head.context.ctx.grad
    assert grad is not None and grad.abs().sum() > 0


def test_writes_through_data_and_copy_invalidate_the_cache(bb: Backbone) -> None:
    model, fresh = _coop(bb).eval(), _coop(bb).eval()
    ctx = model.head.context.ctx
    saved = ctx.detach().clone()
    x = torch.rand(2, 3, 32, 32)
    new = torch.randn(ctx.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = model(x)
        ctx.data[...] = new  # does not bump the version counter
        after = model(x)
        fresh.head.context.ctx.data[...] = new
        assert not torch.allclose(first, after, atol=1e-3)
        assert torch.equal(after, fresh(x))
    # One TPT-style step in eval mode, then reset by copying the saved context back.
    opt = torch.optim.SGD([ctx], lr=1.0)
    model(x).logsumexp(-1).sum().backward()
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(model(x), after)
        ctx.copy_(saved)
        assert torch.equal(model(x), first)


def test_features_cached_in_inference_mode_serve_an_attack(bb: Backbone) -> None:
    """A frozen context: features computed once (even under inference_mode, e.g. an
    evaluation loop) are still usable when an attack differentiates through the image."""
    model = _coop(bb).eval()
    model.head.context.ctx.requires_grad_(False)
    calls = []
    context = model.head.context
    original = context.forward
    context.forward = lambda backbone: (calls.append(1), original(backbone))[1]
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        model(x)
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x).logsumexp(-1).sum(), x)
    assert grad.abs().sum() > 0
    assert len(calls) == 1  # grad mode on, but nothing to differentiate in the text tower
