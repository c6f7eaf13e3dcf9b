"""Zero-init attention over adaption prompts, in every mode, against the frozen model and an explicit reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_adapter.adapters import build_adapter_model
from lit_adapter.adapters.prompt import GatedPrompt, gated_prompts, prompt_attention
from lit_adapter.inference.generate import generate_tokens
from tests.adapters.helpers import IDS, MODES, images, randomize, reference_adapter
from tests.adapters.reference import Adapter, prompt_term, reference_logits


def visual_tokens(model, batch: int = 2, seed: int = 0):
    return model.encode_images(images(batch, seed)).detach() if model.visual is not None else None


@pytest.mark.parametrize("mode", list(MODES))
def test_fresh_adapter_reproduces_the_base_model_bit_for_bit(stories260k, mode):
    config = MODES[mode]
    expected = stories260k(IDS)
    model = build_adapter_model(stories260k, config)
    logits = model(IDS, images=images() if config.visual else None)
    assert torch.equal(logits, expected)
    prompts = [m.prompt for m in gated_prompts(model).values() if m.prompt is not None]
    assert prompts, "every mode has static prompts"
    for prompt in prompts:  # nn.Embedding's N(0, 1) init, not zero: the zero gates alone keep the model unchanged
        assert prompt.std() > 0.5


@pytest.mark.parametrize("mode", list(MODES))
def test_gated_prompt_term_equals_two_softmax_reference(stories260k, mode):
    model = build_adapter_model(stories260k, MODES[mode]).double()  # float64: the tolerance measures formulas only
    randomize(model)
    visual = visual_tokens(model)
    captured = {}

    def capture(index: int):
        def hook(module, args, out) -> None:
            captured[index] = (args[1].detach(), out.detach())  # (queries, gated prompt term)

        return hook

    for index, block in enumerate(model.llama.layers):
        if block.attention.adaption_prompt is not None:
            block.attention.adaption_prompt.register_forward_hook(capture(index))
    with torch.no_grad():
        model(IDS, visual_tokens=visual)
    reference = reference_adapter(model, visual)
    assert captured
    for index, (q, out) in captured.items():
        weights = model.llama.layers[index].attention
        expected = prompt_term(q, index, weights.wk.weight.detach(), weights.wv.weight.detach(), model.config,
                               reference)
        assert expected is not None and expected.abs().max() > 1e-2  # the gates really are open
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", list(MODES))
def test_logits_with_open_gates_equal_the_reference_model(stories260k, mode, float64_base):
    base = {k: v.detach().double() for k, v in stories260k.state_dict().items()}
    with torch.no_grad():
        base_logits = stories260k.double()(IDS)
    model = build_adapter_model(stories260k, MODES[mode]).double()
    randomize(model)
    visual = visual_tokens(model)
    with torch.no_grad():
        logits = model(IDS, visual_tokens=visual)
        plain = reference_logits(base, model.config, IDS, Adapter())
        expected = reference_logits(base, model.config, IDS, reference_adapter(model, visual))
    torch.testing.assert_close(plain, base_logits, atol=1e-6, rtol=0)
    assert (logits - plain).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["v1", "v2-early-overlap-newgate", "v2-late", "v1-global"])
def test_fast_prompt_attention_equals_the_plain_formula(stories260k, mode):
    """GatedPrompt's fast path (ops.grouped_attention) equals its plain lines (prompt_attention(fast=False))."""
    with torch.no_grad():
        base = stories260k.double()(IDS)
    model = build_adapter_model(stories260k, MODES[mode]).double()
    randomize(model)
    visual = visual_tokens(model)
    prompts = gated_prompts(model).values()
    with torch.no_grad():
        fast = model(IDS, visual_tokens=visual)
        for prompt in prompts:
            prompt.fast = False
        plain = model(IDS, visual_tokens=visual)
    assert (fast - base).abs().max() > 1e-2  # the gates are open
    torch.testing.assert_close(fast, plain, atol=1e-10, rtol=0)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 5, 8, generator=generator, dtype=torch.float64)
    keys, values = torch.randn(2, 1, 4, 3, 8, generator=generator, dtype=torch.float64).unbind(0)  # 4 KV heads
    gate = torch.randn(1, 8, 1, 1, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(prompt_attention(q, keys, values, gate), prompt_attention(q, keys, values, gate, False))


def test_grouped_query_attention_prompts_use_the_kv_heads(stories260k):
    assert stories260k.config.n_kv_heads * 2 == stories260k.config.n_heads  # 4 KV heads for 8 query heads
    model = build_adapter_model(stories260k, MODES["v2-early"])
    prompt = model.llama.layers[0].attention.adaption_prompt
    attention = model.llama.layers[0].attention
    kv = prompt.keys_values(attention, visual_tokens(model), torch.float32)
    assert kv["visual"][0].shape == (2, 4, 3, 8)
    attention = model.llama.layers[4].attention
    kv = attention.adaption_prompt.keys_values(attention, None, torch.float32)
    assert kv["static"][0].shape == (1, 4, 4, 8)  # one set of prompt keys shared across the batch


def test_zero_gates_still_get_gradients(stories260k):
    model = build_adapter_model(stories260k, MODES["v2-early"])
    logits = model(IDS, images=images())
    F.cross_entropy(logits[:, :-1].flatten(0, 1), IDS[:, 1:].flatten()).backward()
    gates = [p for n, p in model.adapter_parameters().items() if n.endswith("gate")]
    assert gates and all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)


def test_eval_pass_then_training_step_trains_the_prompts(stories260k):
    """LitGPT kept prompt keys/values on the module after a no-grad pass, and the prompts stopped learning."""
    model = build_adapter_model(stories260k, MODES["v2-early-overlap-newgate"])
    randomize(model)
    pics = images()
    model.eval()
    with torch.no_grad():
        model(IDS, images=pics)
    list(generate_tokens(model, IDS[0], 3, visual_tokens=visual_tokens(model, 1)))
    for module in gated_prompts(model).values():
        assert not [k for k, v in vars(module).items() if isinstance(v, torch.Tensor)]
    model.train()
    optimizer = torch.optim.SGD(list(model.adapter_parameters().values()), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.adapter_parameters().items()}
    logits = model(IDS, images=pics)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), IDS[:, 1:].flatten()).backward()
    for name, param in model.adapter_parameters().items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    optimizer.step()
    for name, param in model.adapter_parameters().items():
        if name.endswith(".prompt"):
            assert not torch.equal(param, before[name]), name


@pytest.mark.parametrize("mode", ["v2-lora-alpha-no-prompt-lora", "v2-early-overlap-newgate", "v2-late", "v1-global"])
def test_kv_cached_decoding_equals_uncached_recomputation(stories260k, mode, monkeypatch, float64_base):
    model = build_adapter_model(stories260k, MODES[mode]).double().eval()
    randomize(model)
    ids = IDS[:1]
    calls = []
    original = GatedPrompt.keys_values
    monkeypatch.setattr(GatedPrompt, "keys_values", lambda self, *a: calls.append(1) or original(self, *a))
    for seed in (0, 1):  # a second generation with another image must not reuse the first one's prompt keys
        visual = visual_tokens(model, 1, seed)
        with torch.no_grad():
            full = model(ids, visual_tokens=visual)
            calls.clear()
            model.set_kv_cache(1, ids.shape[1])
            steps = [model(ids[:, :4], input_pos=torch.arange(4), visual_tokens=visual)]
            steps += [model(ids[:, t : t + 1], input_pos=torch.tensor([t]), visual_tokens=visual)
                      for t in range(4, ids.shape[1])]
            layers = model.llama.layers
            assert all(cache.prompt_kv is not None for cache, block in zip(model.llama.kv_caches, layers, strict=True)
                       if block.attention.adaption_prompt is not None)
            model.clear_kv_cache()
        assert len(calls) == len(gated_prompts(model))  # prompt keys/values computed once per generation
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-9, rtol=0)

        generated = list(generate_tokens(model, ids[0], 5, visual_tokens=visual))
        sequence = ids[0].tolist()
        with torch.no_grad():
            for _ in range(5):
                sequence.append(int(model(torch.tensor([sequence]), visual_tokens=visual)[0, -1].argmax()))
        assert generated == sequence[ids.shape[1]:]
