"""The opt-in CPU decoding context: measured settings, held only inside `with`, restored on every exit; the library
leaves torch's process-wide settings alone outside it."""

from __future__ import annotations

import pytest
import torch

from lit_adapter.checkpoint import load_model, meta_model
from lit_adapter.config import ModelConfig
from lit_adapter.inference import cpu
from lit_adapter.inference.cpu import CPUDecoding, column_major_weights, decode_step, linear_shapes
from lit_adapter.inference.generate import generate_batch, generate_tokens
from tests.inference.conftest import text_adapter


def torch_settings() -> tuple[int, bool, int]:
    return torch.get_num_threads(), torch.backends.mkldnn.enabled, torch.get_num_interop_threads()


@pytest.fixture
def two_threads():
    """Start from two threads (the conftest's one thread would hide a library call that sets one)."""
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(1)


def test_column_major_weights_keep_values_and_tokens(stories260k_dir, tokenizer):
    model = load_model(stories260k_dir)
    prompt = torch.tensor(tokenizer.encode("Once upon a time", bos=True))
    with torch.inference_mode():
        logits = model(prompt[None])
    expected = list(generate_tokens(model, prompt, 40))
    assert column_major_weights(model) == sum(linear_shapes(model).values())  # every float32 linear weight
    wq = model.layers[0].attention.wq.weight
    assert wq.stride() == (1, wq.shape[0]) and model.output.weight.stride() == (1, model.output.weight.shape[0])
    assert model.output.weight is model.tok_embeddings.weight  # still tied
    with torch.inference_mode():
        torch.testing.assert_close(model(prompt[None]), logits, rtol=1e-5, atol=1e-5)
    assert list(generate_tokens(model, prompt, 40)) == expected
    half = load_model(stories260k_dir, dtype=torch.bfloat16)
    column_major_weights(half)
    assert half.layers[0].attention.wq.weight.is_contiguous()  # by default float32 weights only


def test_prepare_lays_out_the_chosen_shapes_only(stories260k_dir):
    model = load_model(stories260k_dir)
    w1 = model.layers[0].feed_forward.w1.weight
    shape = tuple(w1.shape)
    assert CPUDecoding().prepare(model) == 0
    changed = CPUDecoding(column_major=[shape]).prepare(model)
    assert changed == linear_shapes(model)[shape] == 2 * model.config.n_layers  # w1 and w3 of every layer
    assert w1.stride() == (1, shape[0]) and model.layers[0].feed_forward.w2.weight.is_contiguous()
    half = load_model(stories260k_dir, dtype=torch.bfloat16)
    assert CPUDecoding(column_major=[shape]).prepare(half) == changed  # a measured choice holds for any dtype


def test_context_restores_threads_and_mkldnn_on_exit_and_on_error(two_threads):
    before = torch_settings()
    decoding = CPUDecoding(threads=1, one_row_kernels=True)
    with decoding as entered:
        assert entered is decoding and cpu.active() is decoding
        assert torch.get_num_threads() == 1
        torch.backends.mkldnn.enabled = False  # whatever happens inside
    assert torch_settings() == before and cpu.active() is None
    with pytest.raises(KeyError):
        with decoding:
            assert torch.get_num_threads() == 1
            with decoding.step(torch.tensor([[5]])):
                assert not torch.backends.mkldnn.enabled
                raise KeyError("interrupted")
    assert torch_settings() == before and cpu.active() is None
    with CPUDecoding(threads=1):
        with CPUDecoding() as inner:  # nested: the innermost is active, each restores what it found
            assert cpu.active() is inner and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch_settings() == before


def test_one_row_kernels_only_for_a_single_cpu_token_inside_the_context(stories260k_dir):
    decoding = CPUDecoding(one_row_kernels=True)
    one, two = torch.tensor([[5]]), torch.tensor([[5, 6]])
    assert torch.backends.mkldnn.enabled
    with decoding.step(one):  # not entered: no effect
        assert torch.backends.mkldnn.enabled
    with decoding:
        with decoding.step(one):
            assert not torch.backends.mkldnn.enabled
        assert torch.backends.mkldnn.enabled
        with decoding.step(two):
            assert torch.backends.mkldnn.enabled
        with decode_step(one):  # what the decoding loops call
            assert not torch.backends.mkldnn.enabled
        with CPUDecoding().step(one):
            assert torch.backends.mkldnn.enabled
    with decode_step(one):  # no active context
        assert torch.backends.mkldnn.enabled
    # the kernels differ, the numbers agree to bf16 rounding
    model = load_model(stories260k_dir, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = model(one).float()
        with decoding, decoding.step(one):
            native = model(one).float()
    torch.testing.assert_close(native, expected, rtol=0.02, atol=0.05)


def mkldnn_per_forward(model) -> list[bool]:
    states: list[bool] = []
    model.register_forward_pre_hook(lambda module, args: states.append(torch.backends.mkldnn.enabled))
    return states


def test_decoding_loops_ask_the_active_context_per_step(stories260k_dir, tokenizer):
    model = load_model(stories260k_dir)
    states = mkldnn_per_forward(model)
    prompt = torch.tensor(tokenizer.encode("Once upon a time", bos=True))
    expected = list(generate_tokens(model, prompt, 6))
    assert states == [True] * 6
    states.clear()
    decoding = CPUDecoding(one_row_kernels=True)
    with decoding:
        assert list(generate_tokens(model, prompt, 6)) == expected  # float32: the same products
        assert states == [True] + [False] * 5  # the prefill keeps oneDNN, single tokens do not
        states.clear()
        assert generate_batch(model, [prompt, prompt[:3]], 4)[0] == expected[:4]
        assert all(states)  # batch steps keep oneDNN
        tokens = generate_tokens(model, prompt, 6)
        next(tokens)
        next(tokens)
        tokens.close()  # a generator left in the middle leaves no setting behind
        assert torch.backends.mkldnn.enabled
    assert torch.backends.mkldnn.enabled


def test_library_calls_leave_torch_settings_alone(stories260k_dir, tokenizer, two_threads):
    before = torch_settings()
    model = load_model(stories260k_dir)
    adapted = text_adapter(load_model(stories260k_dir))
    prompts = [torch.tensor(tokenizer.encode(text, bos=True)) for text in ("Once upon a time", "The dog")]
    list(generate_tokens(model, prompts[0], 5))
    generate_batch(model, prompts, 5)
    list(generate_tokens(adapted.llama, prompts[0], 5))
    generate_batch(adapted.llama, prompts, 5)
    decoding = CPUDecoding.for_model(adapted)
    decoding.prepare(adapted.llama)
    assert torch_settings() == before


def test_for_model_measures_once_and_chooses_among_the_candidates(stories260k_dir, monkeypatch, two_threads):
    model = load_model(stories260k_dir)
    monkeypatch.setattr(cpu, "_PROBED", {})
    calls = []
    original = cpu.probe
    monkeypatch.setattr(cpu, "probe", lambda llama: calls.append(llama) or original(llama))
    before = torch_settings()
    decoding = CPUDecoding.for_model(model)
    assert torch_settings() == before  # probing restores what it tries
    assert model._rope is None  # and keeps no tensor made in inference mode on the model
    assert decoding.threads in (None, 1) and isinstance(decoding.one_row_kernels, bool)
    assert decoding.column_major <= set(linear_shapes(model))
    assert decoding.float32_products == frozenset()  # a float32 model has no half-precision products
    again = CPUDecoding.for_model(load_model(stories260k_dir))
    assert len(calls) == 1 and repr(again) == repr(decoding)  # measured once per process and model shape
    torch.set_num_threads(1)
    assert CPUDecoding.for_model(model).threads is None and len(calls) == 2  # one thread already: nothing to try


def test_for_model_off_the_cpu_is_a_no_op():
    decoding = CPUDecoding.for_model(meta_model(ModelConfig.from_name("tiny")))
    assert (decoding.threads, decoding.one_row_kernels, decoding.column_major) == (None, False, frozenset())
    assert decoding.float32_products == frozenset()


def test_row_classes_round_on_a_log_scale():
    assert [cpu.row_class(rows) for rows in (1, 2, 3, 8, 20, 22, 23, 64, 4096)] == [1, 1, 8, 8, 8, 8, 64, 64, 64]


def test_float32_products_for_the_chosen_shapes_and_rows_only():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32).to(torch.bfloat16)
    decoding = CPUDecoding(float32_products=[((32, 64), 8)])
    batch, token = torch.randn(8, 1, 64, dtype=torch.bfloat16), torch.randn(1, 1, 64, dtype=torch.bfloat16)
    in_float32 = torch.nn.functional.linear(batch.float(), linear.weight.float(), linear.bias.float()).bfloat16()
    native, native_token = linear(batch), linear(token)
    full = torch.nn.Linear(64, 32)
    with decoding:
        with decoding.step(torch.zeros(8, 1, dtype=torch.long)):
            assert torch.equal(linear(batch), in_float32) and linear(batch).dtype == torch.bfloat16
            assert torch.equal(linear(token), native_token)  # one row: not chosen
            assert torch.equal(full(batch.float()), torch.nn.functional.linear(batch.float(), full.weight, full.bias))
        with decoding.step(torch.zeros(1, 1, dtype=torch.long)):  # a one-row step enters no mode
            assert torch.equal(linear(batch), native)
    with decoding.step(torch.zeros(8, 1, dtype=torch.long)):  # not entered: no effect
        assert torch.equal(linear(batch), native)
    torch.testing.assert_close(in_float32.float(), native.float(), rtol=0.02, atol=0.02)  # the same up to rounding


def test_float32_products_keep_greedy_tokens(stories260k_dir, tokenizer):
    model = load_model(stories260k_dir, dtype=torch.bfloat16)
    shapes = set(linear_shapes(model))
    everything = CPUDecoding(float32_products=[(shape, rows) for shape in shapes for rows in cpu.ROW_CLASSES])
    prompt = torch.tensor(tokenizer.encode("Once upon a time", bos=True))
    expected = list(generate_tokens(model.float(), prompt, 12))
    model.bfloat16()
    with everything:  # bf16 weights, float32 sums: the float32 model's greedy tokens
        assert list(generate_tokens(model, prompt, 12)) == expected
