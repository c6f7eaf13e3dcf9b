"""Decoding with adapters: zero-init identity, KV cache vs full recomputation, batched vs one-by-one, stop text."""

from __future__ import annotations

import torch

from lit_adapter.adapters import AdapterConfig, build_adapter_model
from lit_adapter.adapters.prompt import GatedPrompt
from lit_adapter.checkpoint import load_model
from lit_adapter.inference.generate import generate_batch, generate_tokens, padded_mask, row_positions
from lit_adapter.inference.stream import StopFilter, cut_at_stop
from tests.helpers import write_image
from tests.inference.conftest import text_adapter, visual_adapter

PROMPTS = ["Once upon a time", "Lily had a big red ball and she", "The", "Tom and his dog went to the park. They"]


def encode_all(tokenizer, texts=PROMPTS) -> list[torch.Tensor]:
    return [torch.tensor(tokenizer.encode(t)) for t in texts]


def greedy_uncached(model, prompt: torch.Tensor, steps: int, visual_tokens=None) -> list[int]:
    """Reference decoding: the whole sequence through the model at every step, no KV cache, argmax."""
    ids = prompt[None]
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(ids, visual_tokens=visual_tokens)[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def test_zero_init_adapter_generates_what_the_base_generates(stories260k_dir, tokenizer):
    base = load_model(stories260k_dir)
    expected = [list(generate_tokens(base, p, 40, eos_id=tokenizer.eos_id)) for p in encode_all(tokenizer)]
    configs = (AdapterConfig.v1(adapter_len=5, adapter_layers=5), AdapterConfig.v2(adapter_len=5, adapter_layers=4))
    for config in configs:
        adapted = build_adapter_model(load_model(stories260k_dir), config).eval()  # gates 0, bias 0, scale 1
        got = [list(generate_tokens(adapted.llama, p, 40, eos_id=tokenizer.eos_id)) for p in encode_all(tokenizer)]
        assert got == expected


def test_open_gates_change_the_output(stories260k_dir, tokenizer):
    """Guards the tests below: the adapter they use is not a no-op."""
    prompt = encode_all(tokenizer)[0]
    base = list(generate_tokens(load_model(stories260k_dir), prompt, 30))
    adapted = list(generate_tokens(text_adapter(load_model(stories260k_dir)).llama, prompt, 30))
    assert base != adapted


def test_cached_decoding_equals_full_recomputation(stories260k_dir, tokenizer):
    model = text_adapter(load_model(stories260k_dir), lora_rank=2)
    for prompt in encode_all(tokenizer)[:2]:
        cached = list(generate_tokens(model.llama, prompt, 25))
        assert cached == greedy_uncached(model.llama, prompt, 25)


def test_prompt_keys_values_are_computed_once_per_generation(stories260k_dir, tokenizer, monkeypatch):
    model = text_adapter(load_model(stories260k_dir))
    calls = []
    original = GatedPrompt.keys_values

    def counting(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GatedPrompt, "keys_values", counting)
    adapted_layers = sum(isinstance(b.attention.adaption_prompt, GatedPrompt) for b in model.llama.layers)
    for _ in range(2):  # a second generation gets a fresh cache: computed again, once
        tokens = list(generate_tokens(model.llama, encode_all(tokenizer)[0], 20))
        assert len(tokens) == 20
    assert adapted_layers == 4 and len(calls) == 2 * adapted_layers
    assert model.llama.kv_caches is None  # nothing outlives the generation


def test_padding_mask_and_positions_by_hand():
    pads = torch.tensor([2, 0])
    slots = torch.arange(3)
    mask = padded_mask(pads, slots, 3)[:, 0].int().tolist()
    # row 0: slots 0,1 are padding (each sees itself only), slot 2 sees itself; row 1: plain causal
    assert mask[0] == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert mask[1] == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert row_positions(pads, slots).tolist() == [[0, 0, 0], [0, 1, 2]]
    assert row_positions(pads, torch.tensor([5])).tolist() == [[3], [5]]


def test_batched_equals_one_by_one_base_and_adapter(stories260k_dir, tokenizer):
    prompts = encode_all(tokenizer)
    assert len({p.numel() for p in prompts}) == len(prompts)
    for model in (load_model(stories260k_dir), text_adapter(load_model(stories260k_dir)).llama):
        one_by_one = [list(generate_tokens(model, p, 30, eos_id=tokenizer.eos_id)) for p in prompts]
        assert generate_batch(model, prompts, 30, eos_id=tokenizer.eos_id) == one_by_one


def test_batched_equals_one_by_one_with_images(stories260k_dir, tokenizer, tmp_path):
    from lit_adapter.images import load_images

    model = visual_adapter(load_model(stories260k_dir))
    paths = [write_image(tmp_path / f"{i}.png", c) for i, c in enumerate([(200, 30, 30), (20, 90, 220), (0, 0, 0)])]
    pixels = load_images(paths, model.visual.config.transform(train=False), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        visual = model.encode_images(pixels)
    prompts = encode_all(tokenizer)[:3]
    one_by_one = [
        list(generate_tokens(model.llama, p, 20, visual_tokens=visual[i : i + 1])) for i, p in enumerate(prompts)
    ]
    assert generate_batch(model.llama, prompts, 20, visual_tokens=visual) == one_by_one
    no_image = list(generate_tokens(model.llama, prompts[0], 20))
    assert no_image != one_by_one[0]  # the image reaches the model


def test_batch_rows_stop_independently(stories260k_dir, tokenizer):
    model = load_model(stories260k_dir)
    prompts = encode_all(tokenizer)[:2]
    full = generate_batch(model, prompts, 20)
    stopped = generate_batch(model, prompts, 20, should_stop=lambda row, tokens: row == 0 and len(tokens) == 5)
    assert stopped == [full[0][:5], full[1]]


def test_stop_filter_holds_back_a_possible_stop_and_cuts_it():
    stops = StopFilter(["###", "END"])
    shown = [stops.push(p) for p in ["Hello #", "# wor", "ld ##", "# never"]]
    assert shown == ["Hello ", "## wor", "ld ", ""]
    assert stops.stopped and stops.text == "Hello ## world "
    assert stops.push("more") == "" and stops.flush() == ""
    tail = StopFilter(["###"])
    assert tail.push("a #") == "a " and tail.flush() == "#" and tail.text == "a #"
    assert cut_at_stop("one END two", ["###", "END"]) == ("one ", True)
    assert cut_at_stop("one", ["END"]) == ("one", False)
