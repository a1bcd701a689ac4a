"""Test-time adapters (source, Tent, CoTTA, VDP, TPT), their registry, and the stream runner."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from _attack_models import synthetic_data
from torch import nn

from vpt_robust.config import HeadConfig, PromptConfig
from vpt_robust.corruptions import CorruptionStream, GeneratedSource, corrupt
from vpt_robust.methods.stream_runner import StreamAttack, run_stream
from vpt_robust.methods.tta import build_adapter
from vpt_robust.methods.tta.base import entropy

FAST = {"n_augmentations": 2}


class BNNet(nn.Module):
    """A 16 px BatchNorm CNN taking [0,1] images (normalisation inside)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - 0.5) / 0.25)


@functools.lru_cache(maxsize=1)
def _trained() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = BNNet()
    images, labels = synthetic_data(1024, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for start in range(0, 40 * 64, 64):  # ~97% clean accuracy, ~25% under contrast 5
        idx = torch.arange(start, start + 64) % 1024
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def net() -> BNNet:
    model = BNNet()
    model.load_state_dict(_trained())
    return model.eval()


@pytest.fixture(scope="module")
def shifted() -> tuple[torch.Tensor, torch.Tensor]:
    """Test images under a strong contrast shift (BatchNorm statistics no longer fit)."""
    images, labels = synthetic_data(64, seed=1)
    return corrupt(images, "contrast", 5), labels


def _stream(protocol: str = "continual", **kw) -> CorruptionStream:
    images, labels = synthetic_data(48, seed=2)
    kw.setdefault("corruptions", ("contrast", "gaussian_noise", "fog"))
    return CorruptionStream(GeneratedSource(images, labels), protocol, batch_size=16, **kw)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- registry


def test_registry_errors_name_the_method_and_argument(net: BNNet) -> None:
    with pytest.raises(ValueError, match=r"adapter: 'tnet' is not one of \['cotta'"):
        build_adapter("tnet", net)
    with pytest.raises(
        ValueError, match=r"bad arguments for adapter 'tent': lr_: unknown argument"
    ):
        build_adapter("tent", net, lr_=1e-3)
    with pytest.raises(ValueError, match=r"'cotta': restore_p: 2"):
        build_adapter("cotta", net, restore_p=2)
    with pytest.raises(ValueError, match=r"'vdp_dap_only': prompts: 'both'"):
        build_adapter("vdp_dap_only", net, prompts="both")
    with pytest.raises(ValueError, match="no normalisation layer"):
        build_adapter("tent", nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10)))
    with pytest.raises(ValueError, match="no CoOp text context"):
        build_adapter("tpt", net)
    with pytest.raises(ValueError, match="images: expected a float"):
        build_adapter("source", net)(torch.zeros(3, 16, 16))


# ---------------------------------------------------------------- norm


def test_norm_uses_test_batch_statistics_and_never_writes_the_model(net, shifted) -> None:
    x, y = shifted
    before = _snapshot(net)
    source, norm = build_adapter("source", net), build_adapter("norm", net)
    src_acc = float((source(x).argmax(-1) == y).float().mean())
    norm_acc = float((norm(x).argmax(-1) == y).float().mean())
    assert norm_acc > src_acc + 0.2  # the contrast shift is a BatchNorm-statistics shift
    assert _identical(_snapshot(net), before)
    assert norm(x[:32]).shape == (32, 10)
    with pytest.raises(ValueError, match="norm: the model has no BatchNorm"):
        build_adapter("norm", nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10)))


# ---------------------------------------------------------------- Tent


def test_tent_lowers_entropy_and_touches_only_norm_affine_parameters(net, shifted) -> None:
    x, _ = shifted
    before = _snapshot(net)
    tent = build_adapter("tent", net, lr=3e-2)
    adapted = {n for n, p in tent.net.named_parameters() if p.requires_grad}
    assert adapted == {f"body.{i}.{w}" for i in (1, 5) for w in ("weight", "bias")}
    with torch.no_grad():
        h0 = float(entropy(tent.predict(x)).mean())
    for _ in range(10):
        tent(x)
    with torch.no_grad():
        h1 = float(entropy(tent.predict(x)).mean())
    assert h1 < 0.85 * h0
    after = dict(tent.net.named_parameters())
    for name, value in before.items():
        if name in after:
            assert torch.equal(after[name], value) is (name not in adapted), name
    # BatchNorm normalises with the batch's own statistics, and the model passed in is untouched.
    assert all(m.running_mean is None for m in tent.net.modules() if isinstance(m, nn.BatchNorm2d))
    assert _identical(_snapshot(net), before)


# ---------------------------------------------------------------- CoTTA


def _linear_model(width: int = 64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 16 * 16, width), nn.Tanh(), nn.Linear(width, 5)
    )


def test_cotta_teacher_is_the_ema_of_the_student() -> None:
    x = torch.rand(8, 3, 16, 16)
    cotta = build_adapter("cotta", _linear_model(), restore_p=0.0, confidence=0.0, lr=0.1)
    with torch.no_grad():
        for p in cotta.teacher.parameters():
            p.fill_(0.5)  # hand-set teacher, away from the student
        expected_out = cotta.teacher(x)
    out = cotta(x)
    assert torch.equal(out, expected_out)  # confident: the teacher's plain prediction
    for (name, t), s in zip(
        cotta.teacher.named_parameters(), cotta.student.parameters(), strict=True
    ):
        assert torch.allclose(t, 0.999 * 0.5 + 0.001 * s.detach(), atol=1e-7), name
        assert not torch.allclose(s, cotta.anchor.get_parameter(name)), name  # it moved


def test_cotta_stochastic_restore_rate() -> None:
    x = torch.rand(8, 3, 16, 16)
    for p_restore, lo, hi in ((0.0, 0.0, 0.0), (0.3, 0.25, 0.35), (1.0, 1.0, 1.0)):
        cotta = build_adapter("cotta", _linear_model(), restore_p=p_restore, lr=0.1, **FAST)
        cotta(x)
        w = cotta.student.get_parameter("1.weight")
        frac = float((w == cotta.anchor.get_parameter("1.weight")).float().mean())
        assert lo <= frac <= hi, (p_restore, frac)


def test_cotta_averages_augmented_teacher_views_when_unconfident() -> None:
    x = torch.rand(8, 3, 16, 16)
    plain = build_adapter("cotta", _linear_model(), confidence=0.0, **FAST)
    augmented = build_adapter("cotta", _linear_model(), confidence=1.0, **FAST)
    assert torch.equal(plain(x), plain.anchor(x))  # teacher == source before the first update
    out = augmented(x)
    assert not torch.allclose(out, augmented.anchor(x))
    assert augmented.counts["forward"] == 8 * (2 + 2)  # student, anchor, 2 augmented views


# ---------------------------------------------------------------- VDP


def test_vdp_leaves_every_source_weight_bit_identical(net) -> None:
    net.train()  # BatchNorm in train mode would update its running stats if VDP ran it so
    before = _snapshot(net)
    vdp = build_adapter("vdp", net, ema=0.5, **FAST)
    run_stream(vdp, _stream())
    assert _identical(_snapshot(net), before)
    assert net.training and all(m.training for m in net.modules())
    assert all(p.grad is None and p.requires_grad for p in net.parameters())
    assert float(vdp.student["dap"].delta.detach().abs().sum()) > 0


def _movement(name: str, net: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    vdp = build_adapter(name, net, importance=1.0, shift_threshold=1.0, lr=1e-2, **FAST)
    for _ in range(12):
        vdp(x)
    return tuple(float(vdp.student[k].delta.detach().abs().mean()) for k in ("dap", "dsp"))


def test_vdp_homeostasis_holds_the_dap_back_while_the_dsp_moves(net, shifted) -> None:
    x, _ = shifted
    dap, dsp = _movement("vdp", net, x)
    assert dsp > 0 and dap < 0.6 * dsp
    free_dap, free_dsp = _movement("vdp_no_homeostasis", net, x)
    assert free_dap > 0.8 * free_dsp


def test_vdp_detects_a_domain_change_and_restarts_the_dsp(net) -> None:
    clean, _ = synthetic_data(32, seed=3)
    noisy = corrupt(clean, "contrast", 5)
    vdp = build_adapter("vdp", net, shift_threshold=0.05, **FAST)
    with torch.no_grad():
        conf = [float(F.softmax(net(b), -1).amax(-1).mean()) for b in (clean, noisy)]
    assert abs(conf[0] - conf[1]) > 0.05  # the test needs a visible confidence shift
    for _ in range(4):
        vdp(clean)
    assert vdp.shifts == 0
    lr = vdp.args.lr
    assert float(vdp.student["dsp"].delta.detach().abs().max()) > 1.5 * lr
    dap_steps = int(vdp.opt.state[vdp.student["dap"].delta]["step"])
    vdp(noisy)
    assert vdp.shifts == 1
    assert int(vdp.opt.state[vdp.student["dsp"].delta]["step"]) == 1  # restarted from zero:
    assert float(vdp.student["dsp"].delta.detach().abs().max()) <= lr * 1.001  # one step away
    assert int(vdp.opt.state[vdp.student["dap"].delta]["step"]) == dap_steps + 1  # kept


def test_vdp_before_adapting_predicts_as_its_frozen_source(net, shifted) -> None:
    x, _ = shifted
    for batch_stats, peer in ((True, "norm"), (False, "source")):
        vdp = build_adapter("vdp", net, batch_stats=batch_stats, **FAST)
        assert torch.equal(vdp(x), build_adapter(peer, net)(x))


def test_vdp_hard_target_has_a_gradient_where_the_soft_target_has_none(net, shifted) -> None:
    x, _ = shifted  # no augmented views: the teacher's target is the student's own output
    norms = {}
    for target in ("soft", "hard"):
        vdp = build_adapter("vdp", net, target=target, confidence=0.0, steps=2, **FAST)
        vdp(x)
        assert vdp.counts["backward"] == 2 * len(x)
        vdp.reset()
        vdp._ensure(x)
        with torch.no_grad():
            teacher = vdp.model(x)
        norms[target] = sum(float(g.abs().max()) for g in vdp._grads(x, teacher))
    assert norms["soft"] < 1e-6 and norms["hard"] > 1e-4


def test_vdp_ablations_have_one_prompt(net, shifted) -> None:
    x, _ = shifted
    for name, kinds in (("vdp_dap_only", ["dap"]), ("vdp_dsp_only", ["dsp"])):
        vdp = build_adapter(name, net, **FAST)
        vdp(x)
        assert list(vdp.student) == kinds
        assert vdp.student[kinds[0]].inset == 0


# ---------------------------------------------------------------- reset and resume

METHODS = {
    "tent": {},
    "cotta": {**FAST, "confidence": 1.0, "restore_p": 0.2},
    "vdp": {**FAST, "confidence": 1.0, "ema": 0.5, "shift_threshold": 0.02},
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_reset_restores_the_start_state_exactly(name, net) -> None:
    batches = [b.images for b in _stream()]
    adapter = build_adapter(name, net, **METHODS[name])
    first = [adapter(x) for x in batches[:3]]
    adapter(batches[5])
    adapter.reset()
    again = [adapter(x) for x in batches[:3]]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[2])  # the batches differ, so equality is informative


@pytest.mark.parametrize("name", sorted(METHODS))
def test_mid_stream_resume_equals_an_uninterrupted_run(name, net) -> None:
    batches = [b.images for b in _stream()]
    whole = build_adapter(name, net, **METHODS[name])
    ref = [whole(x) for x in batches]
    first = build_adapter(name, net, **METHODS[name])
    for x in batches[:4]:
        first(x)
    state = first.state_dict()
    first(batches[4])  # continuing must not change the saved state
    resumed = build_adapter(name, net, **METHODS[name])
    resumed.load_state_dict(state)
    out = [resumed(x) for x in batches[4:]]
    assert all(torch.equal(a, b) for a, b in zip(ref[4:], out, strict=True))
    assert resumed.counts == whole.counts
    with pytest.raises(ValueError, match="saved for adapter"):
        build_adapter("source", net).load_state_dict(state)


# ---------------------------------------------------------------- TPT


@pytest.fixture
def coop_model(micro_backbone):
    from vpt_robust.models.classifier import build_classifier

    prompt = PromptConfig(kind="coop", init="a photo of a")
    model = build_classifier(
        micro_backbone, ["cat", "dog", "bird"], prompt, HeadConfig(templates=["a photo of a {}."])
    )
    return model.eval()


def test_tpt_changes_predictions_only_through_the_context_and_resets_it(coop_model) -> None:
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = _snapshot(coop_model)
    with torch.no_grad():
        source = coop_model(x)
    tpt = build_adapter("tpt", coop_model, n_augmented=7, lr=0.5)
    out = tpt(x)
    assert tpt.counts["forward"] == 3 * (8 + 1) and tpt.counts["backward"] == 3 * 1
    assert not torch.allclose(out, source, atol=1e-4)
    assert _identical(_snapshot(coop_model), before)  # the context is back after every image
    assert all(p.grad is None for p in coop_model.parameters())
    tiny = build_adapter("tpt", coop_model, n_augmented=7, lr=1e-9)
    assert torch.allclose(tiny(x), source, atol=1e-5)  # nothing else moves the predictions
    # Episodic: each image is adapted from the same start, whatever came before it.
    used = build_adapter("tpt", coop_model, n_augmented=7, lr=0.5)
    used(x[:2])
    fresh = build_adapter("tpt", coop_model, n_augmented=7, lr=0.5)
    fresh.gen.set_state(used.gen.get_state())
    assert torch.equal(used(x[2:]), fresh(x[2:]))


# ---------------------------------------------------------------- stream runner


def test_runner_source_matches_stream_eval_and_resets_by_policy(net, monkeypatch) -> None:
    from vpt_robust.stages.stream_eval import stream_errors

    stream = _stream("reset_each_shift")
    adapter = build_adapter("source", net)
    resets = []
    monkeypatch.setattr(adapter, "reset", lambda: resets.append(1))
    result = run_stream(adapter, stream)
    ref = stream_errors(stream, {"m": net})["m"]
    assert [r["error"] for r in result.rows] == [r["error"] for r in ref]
    assert [r["corruption"] for r in result.rows] == ["contrast", "gaussian_noise", "fog"]
    assert len(resets) == 3 and result.cost == {"forward": 1.0, "backward": 0.0, "relative": 1.0}
    assert result.mean_error == pytest.approx(sum(r["error"] for r in ref) / 3)
    assert result.late_error == pytest.approx(ref[-1]["error"])


def test_adversarial_stream_attacks_the_current_state_before_adapting(net) -> None:
    stream = _stream(corruptions=("contrast", "fog", "gaussian_noise"))
    attack = StreamAttack(eps=8 / 255, steps=3, segments=[1])
    result = run_stream(build_adapter("tent", net), stream, attack=attack)
    clean = run_stream(build_adapter("tent", net), stream)
    assert [r["attacked"] for r in result.rows] == [False, True, False]
    assert [r["after_attack"] for r in result.rows] == [False, False, True]
    assert result.attacked_error > clean.rows[1]["error"] + 0.2
    assert result.after_attack_error == result.rows[2]["error"]
    assert result.rows[0]["error"] == clean.rows[0]["error"]  # before the attack: the same run
    assert result.cost == clean.cost  # the attacker's passes are not counted as the method's
