"""Joint-training parameter groups: visual (caption data) and language (instruction data)."""

from __future__ import annotations

import pytest

from lit_adapter.adapters import attach_adapters
from lit_adapter.adapters.groups import parameter_groups
from tests.adapters.helpers import MODES


@pytest.mark.parametrize("mode", ["v2-early", "v2-early-overlap-newgate", "v2-late", "v1-global", "v2-lora"])
def test_groups_are_disjoint_and_cover_the_trainable_set(stories260k, mode):
    model = attach_adapters(stories260k, MODES[mode])
    groups = parameter_groups(model)
    visual, language = dict(groups["visual"]), dict(groups["language"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not set(visual) & set(language)
    assert set(visual) | set(language) == trainable == set(model.adapter_names)
    assert not any(name.startswith("visual.clip.") for name in trainable)  # the CLIP tower stays frozen
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("visual.clip."))
    if MODES[mode].visual is None:
        assert not visual
        return
    expected_visual = {n for n in trainable if n.startswith("visual.")}
    if MODES[mode].fusion == "early":  # the early zero-init gated attention learns from captions
        expected_visual |= {f"llama.layers.{i}.attention.adaption_prompt.visual_gate" for i in range(2)}
    assert set(visual) == expected_visual
    static = {n for n in trainable if n.endswith((".adaption_prompt.prompt", ".adaption_prompt.gate"))}
    assert static and static <= set(language)
    if MODES[mode].train_norms:
        assert "llama.norm.weight" in language and "llama.layers.0.attention.wq.bias" in language


def test_groups_follow_requires_grad(stories260k):
    model = attach_adapters(stories260k, MODES["v2-early"])
    model.visual.requires_grad_(False)  # e.g. a phase that trains the language side only
    groups = parameter_groups(model)
    assert {n for n, _ in groups["visual"]} == {"llama.layers.0.attention.adaption_prompt.visual_gate",
                                                "llama.layers.1.attention.adaption_prompt.visual_gate"}
