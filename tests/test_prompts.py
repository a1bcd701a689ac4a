from __future__ import annotations

import pytest
import torch

from vpt_robust.prompts import PaddingPrompt, build_prompt


def test_padding_prompt_matches_paper_size() -> None:
    prompt = PaddingPrompt(224, 30)
    assert sum(p.numel() for p in prompt.parameters()) == 69_840


def test_padding_prompt_leaves_centre_untouched() -> None:
    torch.manual_seed(0)
    prompt = PaddingPrompt(32, 4)
    x = torch.randn(2, 3, 32, 32)
    y = prompt(x)
    assert torch.equal(y[..., 4:-4, 4:-4], x[..., 4:-4, 4:-4])
    assert not torch.allclose(y[..., :4, :], x[..., :4, :])
    assert y.shape == x.shape


def test_padding_prompt_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="pad_size"):
        PaddingPrompt(32, 16)
    with pytest.raises(ValueError, match="built for 32 px"):
        PaddingPrompt(32, 4)(torch.zeros(1, 3, 16, 16))


def test_registry_builds_by_name_and_names_bad_kind() -> None:
    prompt = build_prompt("padding", {}, 224)
    assert prompt.pad_size == 30
    with pytest.raises(ValueError, match="prompt.kind: 'nope'"):
        build_prompt("nope", {}, 32)
    with pytest.raises(ValueError, match="bad arguments for 'padding'"):
        build_prompt("padding", {"width": 3}, 32)
