"""CPU decoding settings kept between processes: the thread count measured in every process, the kernel, layout and
float32 choices read back for the same machine, model and thread counts, measured again when stale, asked for,
unreadable or from another processor."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from lit_adapter.checkpoint import load_model
from lit_adapter.inference import cpu, cpu_store
from lit_adapter.inference.cpu import CPUDecoding

CHOICES = (True, frozenset({(64, 64), (172, 64)}), frozenset({((64, 64), 1), ((512, 64), 8)}))


@pytest.fixture
def measured(monkeypatch):
    """Counts of the two measurements, with fixed answers (the store, not the timing, is under test)."""
    calls = {"threads": 0, "choices": 0}

    def threads(llama):
        calls["threads"] += 1
        return 1

    def choices(llama, threads):
        calls["choices"] += 1
        return CHOICES

    monkeypatch.setattr(cpu, "probe_threads", threads)
    monkeypatch.setattr(cpu, "probe_for_threads", choices)
    monkeypatch.delenv(cpu_store.ENV, raising=False)
    return calls


def new_process(monkeypatch) -> None:
    monkeypatch.setattr(cpu, "_PROBED", {})


def test_a_second_process_reads_the_choices_and_measures_only_the_threads(stories260k_dir, tmp_path, monkeypatch,
                                                                          measured):
    model, store = load_model(stories260k_dir), tmp_path / "cpu-settings.json"
    new_process(monkeypatch)
    first = CPUDecoding.for_model(model, store=store)
    assert (first.threads, first.one_row_kernels, first.column_major, first.float32_products) == (1, *CHOICES)
    assert measured == {"threads": 1, "choices": 1}
    (entry,) = json.loads(store.read_text()).values()
    assert entry["column_major"] == [[64, 64], [172, 64]] and entry["float32_products"] == [[64, 64, 1], [512, 64, 8]]
    new_process(monkeypatch)
    second = CPUDecoding.for_model(model, store=store)
    assert repr(second) == repr(first) and measured == {"threads": 2, "choices": 1}


def test_stale_fresh_unreadable_or_foreign_entries_are_measured_again(stories260k_dir, tmp_path, monkeypatch,
                                                                     measured):
    model, store = load_model(stories260k_dir), tmp_path / "cpu-settings.json"
    new_process(monkeypatch)
    CPUDecoding.for_model(model, store=store)
    entries = json.loads(store.read_text())
    (key,) = entries
    entries[key]["measured_at"] = time.time() - (cpu_store.MAX_AGE_DAYS + 1) * 86400
    store.write_text(json.dumps(entries))
    new_process(monkeypatch)
    CPUDecoding.for_model(model, store=store)
    assert measured["choices"] == 2 and json.loads(store.read_text())[key]["measured_at"] > time.time() - 60

    monkeypatch.setenv(cpu_store.ENV, "fresh")
    new_process(monkeypatch)
    CPUDecoding.for_model(model, store=store)
    assert measured["choices"] == 3
    monkeypatch.delenv(cpu_store.ENV)

    store.write_text("{not json")
    new_process(monkeypatch)
    CPUDecoding.for_model(model, store=store)
    assert measured["choices"] == 4 and list(json.loads(store.read_text())) == [key]

    monkeypatch.setattr(cpu_store, "processor", lambda: "another processor")
    new_process(monkeypatch)
    CPUDecoding.for_model(model, store=store)
    assert measured["choices"] == 5 and len(json.loads(store.read_text())) == 2


def test_the_key_holds_the_processor_torch_and_the_thread_counts(stories260k_dir, tmp_path, monkeypatch, measured):
    model, store = load_model(stories260k_dir), tmp_path / "cpu-settings.json"
    new_process(monkeypatch)
    CPUDecoding.for_model(model, store=store)
    (key,) = json.loads(store.read_text())
    processor, version, capability, model_key = json.loads(key)
    assert version == torch.__version__ and capability == torch.backends.cpu.get_cpu_capability()
    assert str(torch.get_num_threads()) in model_key and model_key.endswith(", 1)")  # default, then chosen threads
    assert json.loads(processor)[2] == os.cpu_count()


def test_a_store_that_cannot_be_written_only_costs_the_measurement(stories260k_dir, tmp_path, monkeypatch, measured):
    blocked = tmp_path / "file"
    blocked.write_text("")
    new_process(monkeypatch)
    decoding = CPUDecoding.for_model(load_model(stories260k_dir), store=blocked / "cpu-settings.json")
    assert decoding.column_major == CHOICES[1]
