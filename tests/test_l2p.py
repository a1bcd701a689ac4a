"""L2P's prompt pool: key matching, the key-pull loss, the query hook and the prompt readout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _tiny_clip_spec import SMALL

from vpt_robust.config import BackboneConfig, HeadConfig, PromptConfig
from vpt_robust.metrics import predict
from vpt_robust.models import Backbone, load_backbone
from vpt_robust.models.classifier import build_classifier
from vpt_robust.prompts import PromptPool, VPTPrompt, build_prompt
from vpt_robust.prompts.pool import majority_vote, select_top_n

CPU = torch.device("cpu")
NAMES = ["red", "green", "blue", "yellow"]
LINEAR = HeadConfig(kind="linear", templates=["a {}"])


def _hand_pool(batchwise: bool = False, task_mask: bool = False) -> PromptPool:
    """Four keys along the axes of R^4, top-2, prompts of 1 token of width 3 (values = id)."""
    pool = PromptPool(3, 4, 1, size=4, length=1, top_n=2, batchwise=batchwise, task_mask=task_mask)
    with torch.no_grad():
        pool.keys.copy_(torch.eye(4) * torch.tensor([[1.0], [2.0], [3.0], [4.0]]))
        pool.prompts.copy_(torch.arange(4.0).view(4, 1, 1).expand(4, 1, 3))
    return pool


QUERIES = torch.tensor(
    [
        [3.0, 0.0, 1.0, 0.0],  # keys 0 then 2
        [0.0, 1.0, 0.0, 2.0],  # keys 3 then 1
        [0.0, 0.0, 2.0, 1.0],  # keys 2 then 3
    ]
)


def test_top_n_selection_on_hand_made_keys() -> None:
    pool = _hand_pool().eval()
    assert torch.equal(pool.select(QUERIES), torch.tensor([[0, 2], [3, 1], [2, 3]]))
    # Ties go to the lower id; the vote counts ids over the batch (2: twice, 3: twice, 0, 1).
    assert torch.equal(select_top_n(torch.tensor([[0.5, 0.5, 0.1]]), 2), torch.tensor([[0, 1]]))
    assert torch.equal(
        majority_vote(torch.tensor([[0, 2], [3, 1], [2, 3]]), 4, 2), torch.tensor([2, 3])
    )
    pool.prepare(QUERIES)
    tokens = pool.layer_tokens(0, 3)
    assert tokens.shape == (3, 2, 3)
    assert torch.equal(tokens[:, :, 0], torch.tensor([[0.0, 2.0], [3.0, 1.0], [2.0, 3.0]]))
    assert pool.layer_tokens(1, 3) is None
    with pytest.raises(RuntimeError, match="call prepare"):
        pool.layer_tokens(0, 3)  # the selection is consumed by one forward


def test_key_pull_loss_matches_the_hand_computed_cosines() -> None:
    pool = _hand_pool().eval()
    pool.prepare(QUERIES)
    q = F.normalize(QUERIES, dim=-1)
    cos = torch.tensor([[q[0, 0], q[0, 2]], [q[1, 3], q[1, 1]], [q[2, 2], q[2, 3]]])
    expected = (1 - cos).sum(1).mean()
    loss = pool.auxiliary_losses()["key_pull"]
    assert torch.allclose(loss, expected)
    loss.backward()
    # Only the selected keys are pulled, each toward its queries; the prompts get nothing.
    grad = pool.keys.grad
    assert pool.prompts.grad is None
    assert grad.abs().sum(1).gt(0).tolist() == [True, True, True, True]
    pool.keys.grad = None
    pool.prepare(QUERIES[[0, 2]])  # selects keys 0, 2, 3: key 1 is not pulled
    pool.auxiliary_losses()["key_pull"].backward()
    assert pool.keys.grad.abs().sum(1).gt(0).tolist() == [True, False, True, True]
    # One step against the gradient raises the summed cosine of the selected pairs.
    with torch.no_grad():
        pool.keys -= 0.5 * grad
    pool.prepare(QUERIES)
    assert pool.auxiliary_losses()["key_pull"] < expected


def test_batchwise_vote_and_task_mask_apply_in_training_only() -> None:
    pool = _hand_pool(batchwise=True).train()
    assert torch.equal(pool.select(QUERIES), torch.tensor([[2, 3]] * 3))
    assert torch.equal(pool.eval().select(QUERIES), torch.tensor([[0, 2], [3, 1], [2, 3]]))
    masked = _hand_pool(task_mask=True).train()
    masked.set_task(1)
    assert torch.equal(masked.select(QUERIES), torch.tensor([[2, 3]] * 3))
    assert torch.equal(masked.eval().select(QUERIES), torch.tensor([[0, 2], [3, 1], [2, 3]]))
    with pytest.raises(ValueError, match="task 2 needs prompts up to 5"):
        masked.set_task(2)


def test_registered_family_validates_its_arguments(micro_backbone: Backbone) -> None:
    pool = build_prompt("l2p", {"size": 6, "length": 2, "top_n": 3}, _target(micro_backbone))
    assert isinstance(pool, PromptPool) and pool.length == 6
    assert pool.keys.shape == (6, micro_backbone.feature_dim)
    with pytest.raises(ValueError, match="top_n: 7 must be <= size 6"):
        PromptConfig(kind="l2p", size=6, top_n=7)


def _target(bb: Backbone):
    from vpt_robust.prompts import PromptTarget

    return PromptTarget.of(bb, NAMES)


def test_the_frozen_query_never_receives_gradient(micro_backbone: Backbone) -> None:
    torch.manual_seed(0)
    model = build_classifier(
        micro_backbone, NAMES, PromptConfig(kind="l2p", size=4, length=2, top_n=2), LINEAR
    )
    seen: list[torch.Tensor] = []
    prepare = model.token_prompt.prepare
    model.token_prompt.prepare = lambda q: (seen.append(q), prepare(q))[1]
    model.train()
    images = torch.rand(5, 3, 32, 32, requires_grad=True)
    logits = model(images)
    loss = F.cross_entropy(logits, torch.arange(5) % 4) + model.auxiliary_losses()["key_pull"]
    loss.backward()
    (query,) = seen
    assert query.shape == (5, micro_backbone.feature_dim)
    assert not query.requires_grad and query.grad_fn is None
    # The query is the frozen model's own feature of the un-prompted image.
    with torch.no_grad():
        plain = micro_backbone.encode_image(micro_backbone.normalize(images))
    assert torch.allclose(query, plain)
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.token_prompt.keys.grad is not None and model.token_prompt.prompts.grad is not None
    assert model.head.fc.weight.grad is not None


def test_plain_prompts_report_no_auxiliary_loss(micro_backbone: Backbone) -> None:
    model = build_classifier(micro_backbone, NAMES, PromptConfig(kind="vpt", length=2), LINEAR)
    model(torch.rand(2, 3, 32, 32))
    assert model.auxiliary_losses() == {}


def test_one_selected_prompt_with_pool_readout_is_vpt_with_those_tokens(
    micro_backbone: Backbone,
) -> None:
    bb = micro_backbone
    geo = bb.token_geometry
    pool = PromptPool(geo.width, bb.feature_dim, geo.patch_size, size=1, length=3, top_n=1)
    pool.readout = "pool"
    vpt = VPTPrompt(geo.width, geo.num_layers, geo.patch_size, 3, "shallow", dropout=0.0)
    with torch.no_grad():
        vpt.tokens.copy_(pool.prompts)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        pool.prepare(bb.encode_image(bb.normalize(x)))
        a = bb.encode_image(bb.normalize(x), token_prompt=pool)
        b = bb.encode_image(bb.normalize(x), token_prompt=vpt)
    assert torch.equal(a, b)


def _tiny_clip() -> Backbone:
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from vpt_robust.models.tiny_clip import build_tiny_clip

    torch.manual_seed(0)
    return Backbone(
        build_tiny_clip(**SMALL),
        kind="clip",
        mean=OPENAI_DATASET_MEAN,
        std=OPENAI_DATASET_STD,
        image_size=32,
        identity={"source": "test", "name": "tiny"},
        tokenizer=open_clip.get_tokenizer("ViT-B-32"),
    )


def _timm() -> Backbone:
    torch.manual_seed(0)
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    cfg = BackboneConfig(source="timm", name="vit_tiny_patch16_224", image_size=32, kwargs=kw)
    return load_backbone(cfg, CPU)


@pytest.mark.parametrize("kind", ["open_clip", "timm", "tiny_clip"])
def test_prompt_readout_is_the_mean_of_the_prompt_tokens_outputs(
    micro_backbone: Backbone, kind: str
) -> None:
    bb = {"open_clip": micro_backbone}.get(kind) or (_timm() if kind == "timm" else _tiny_clip())
    geo = bb.token_geometry
    pool = PromptPool(geo.width, bb.feature_dim, geo.patch_size, size=3, length=2, top_n=2).eval()
    tower = bb.image_model
    trunk = getattr(tower, "trunk", tower)
    blocks = tower.transformer.resblocks if hasattr(tower, "transformer") else trunk.blocks
    out: list[torch.Tensor] = []
    hook = blocks[-1].register_forward_hook(lambda _m, _a, o: out.append(o))
    x = bb.normalize(torch.rand(3, 3, 32, 32))
    with torch.no_grad():
        pool.prepare(bb.encode_image(x))
        out.clear()
        feats = bb.encode_image(x, token_prompt=pool)
    hook.remove()
    n = geo.num_prefix_tokens
    slots = out[0][:, n : n + 4]
    with torch.no_grad():
        if kind == "open_clip":
            expected = tower.ln_post(slots).mean(1) @ tower.proj
        else:
            expected = trunk.fc_norm(trunk.norm(slots).mean(1))
            if kind == "tiny_clip":
                expected = tower.head(expected)
    assert feats.shape == (3, bb.feature_dim)
    assert torch.allclose(feats, expected, atol=1e-5)


def test_evaluation_does_not_depend_on_the_batching(micro_backbone: Backbone) -> None:
    torch.manual_seed(0)
    family = PromptConfig(kind="l2p", size=6, length=2, top_n=2, batchwise=True)
    model = build_classifier(micro_backbone, NAMES, family, LINEAR)
    images = torch.rand(23, 3, 32, 32)
    with torch.no_grad():  # distinct prompts per sample, so a batch-wise vote would change logits
        model.token_prompt.keys.copy_(model.query(images)[torch.arange(6) * 3])
    preds = [predict(model, images, batch_size=b, device=CPU) for b in (1, 5, 23)]
    assert torch.equal(preds[0], preds[1]) and torch.equal(preds[0], preds[2])
    model.eval()
    with torch.no_grad():
        full = model(images)
        single = torch.cat([model(images[i : i + 1]) for i in range(23)])
    assert torch.allclose(full, single, atol=1e-5)
    # In training the vote makes a sample's prompts depend on its batch (why eval does not vote).
    model.train()
    model.token_prompt.prepare(model.query(images))
    voted = model.token_prompt.last_ids
    assert (voted == voted[0]).all()
    model.token_prompt.prepare(model.query(images[:1]))
    model.eval()
    model.token_prompt.prepare(model.query(images))
    assert not (model.token_prompt.last_ids == model.token_prompt.last_ids[0]).all()
