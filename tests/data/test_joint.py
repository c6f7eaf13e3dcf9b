"""Joint training: the alternating resumable loader, and per-step routing of updates to one parameter group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from lit_adapter.adapters.groups import parameter_groups
from lit_adapter.data.caption import CaptionDataModule
from lit_adapter.data.joint import JointDataModule, ResumableLoader, Source
from lit_adapter.errors import LitAdapterError
from tests.training import helpers


class Numbers(Dataset):
    """Item i is {"x": i, "noise": a draw from torch's global RNG} (to see the per-sample seeding)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": torch.tensor(i), "noise": torch.rand(())}


def loader(world_size: int = 1, rank: int = 0, block: int = 1, steps=None, seed: int = 3) -> ResumableLoader:
    sources = [Source("instruction", Numbers(13), None, 2), Source("caption", Numbers(9), None, 3)]
    return ResumableLoader(sources, steps, block=block, seed=seed, rank=rank, world_size=world_size)


def contents(batches) -> list[tuple[str, list[int], list[float]]]:
    return [(b["source"], b["x"].tolist(), b["noise"].tolist()) for b in batches]


def test_alternation_pattern_length_and_blocks() -> None:
    # instruction: 13 // 2 = 6 batches, caption: 9 // 3 = 3; pattern 2:1 in blocks of 2 -> I I I I C C per cycle
    data = loader(block=2, steps={"instruction": 2, "caption": 1})
    assert data.pattern == ["instruction"] * 4 + ["caption"] * 2
    assert len(data) == 6  # min(6 // 4, 3 // 2) = 1 cycle
    assert [b["source"] for b in data] == data.pattern
    assert len(loader()) == 6  # 1:1, block 1: min(6, 3) cycles of 2


def take(data: ResumableLoader, count: int) -> list[dict]:
    """`count` batches the way Lightning draws them: `len(data)` per iter(), a new iter() for each epoch."""
    batches: list[dict] = []
    while len(batches) < count:
        iterator = iter(data)
        for _ in range(min(count - len(batches), len(data) - data.consumed)):
            batches.append(next(iterator))
    return batches


def test_epochs_differ_and_every_sample_of_an_epoch_is_distinct() -> None:
    data = loader()
    first, second = contents(take(data, 6)), contents(take(data, 6))
    assert data.state_dict() == {"epoch": 1, "consumed": 6}
    for epoch in (first, second):
        ids = [x for source, xs, _ in epoch if source == "instruction" for x in xs]
        assert len(ids) == len(set(ids)) == 6
    assert first != second


def test_resume_mid_epoch_continues_with_the_same_batches_and_random_draws() -> None:
    reference = contents(take(loader(), 12))
    for stop in (0, 1, 4, 6, 7):
        run = loader()
        seen = contents(take(run, stop))
        torch.manual_seed(12345)  # the global RNG state after a restart is unrelated
        resumed = loader()
        resumed.load_state_dict(run.state_dict())
        assert seen + contents(take(resumed, 12 - stop)) == reference, stop


def test_ranks_get_disjoint_shards_in_the_same_pattern() -> None:
    ranks = [contents(loader(world_size=2, rank=r)) for r in range(2)]
    assert [s for s, _, _ in ranks[0]] == [s for s, _, _ in ranks[1]]
    for source in ("instruction", "caption"):
        ids = [set(x for s, xs, _ in rank if s == source for x in xs) for rank in ranks]
        assert ids[0] and not ids[0] & ids[1]


def test_too_little_data_is_a_clear_error() -> None:
    with pytest.raises(LitAdapterError, match="caption data: 2 training examples cannot fill one batch"):
        ResumableLoader([Source("caption", Numbers(2), None, 3)])


def test_each_step_updates_exactly_its_own_group(stories260k_dir: Path, instructions: Path, tmp_path: Path) -> None:
    """Instruction step -> only the language group changes; caption step -> only the visual group; the frozen
    weights and the other group stay bit-identical (weight decay included)."""
    lit = helpers.module(stories260k_dir, weight_decay=0.5)
    lit.configure_model()
    helpers.set_gates(lit.model, 0.5)
    groups = {name: {n for n, _ in params} for name, params in parameter_groups(lit.model).items()}
    assert groups["visual"] and groups["language"]
    snapshots = helpers.Snapshots()
    trainer = helpers.trainer(tmp_path, max_steps=4, accumulate_grad_batches=2, callbacks=[snapshots])
    trainer.fit(lit, datamodule=helpers.joint_data(lit, instructions))
    assert snapshots.sources == ["instruction", "caption", "instruction", "caption"]
    expected = {"instruction": groups["language"], "caption": groups["visual"]}
    for before, after, source in zip(snapshots.states[:-1], snapshots.states[1:], snapshots.sources, strict=True):
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert changed == expected[source], source
    optimizer = trainer.optimizers[0]
    assert all(len(optimizer.state[p]) > 0 for p in lit.model.parameters() if p.requires_grad)


def test_without_routing_a_caption_step_updates_both_groups(
    stories260k_dir: Path, instructions: Path, tmp_path: Path
) -> None:
    lit = helpers.module(stories260k_dir, route_groups=False)
    lit.configure_model()
    helpers.set_gates(lit.model, 0.5)
    groups = parameter_groups(lit.model)
    snapshots = helpers.Snapshots()
    trainer = helpers.trainer(tmp_path, max_steps=1, callbacks=[snapshots])
    trainer.fit(lit, datamodule=helpers.joint_data(lit, None))  # captions only
    before, after = snapshots.states
    for name, _ in groups["visual"] + groups["language"]:
        assert not torch.equal(before[name], after[name]), name
    frozen = [n for n, p in lit.model.named_parameters() if not p.requires_grad]
    assert all(torch.equal(before[n], after[n]) for n in frozen)


def test_instructions_only_trains_a_v1_adapter(stories260k_dir: Path, instructions: Path, tmp_path: Path) -> None:
    lit = helpers.module(stories260k_dir, visual=False)
    trainer = helpers.trainer(tmp_path, max_steps=2)
    trainer.fit(lit, datamodule=helpers.joint_data(lit, instructions, captions=False))
    assert trainer.global_step == 2
    gates = [p for n, p in lit.model.named_parameters() if n.endswith(".gate")]
    assert gates and all(bool(g.abs().sum() > 0) for g in gates)


def test_caption_data_without_a_visual_encoder_is_refused(
    stories260k_dir: Path, instructions: Path, tmp_path: Path
) -> None:
    lit = helpers.module(stories260k_dir, visual=False)
    with pytest.raises(LitAdapterError, match="caption data needs a visual encoder"):
        helpers.trainer(tmp_path).fit(lit, datamodule=helpers.joint_data(lit, instructions))


def test_the_models_settings_are_handed_over_once(stories260k_dir: Path, instructions: Path) -> None:
    lit = helpers.module(stories260k_dir)
    data = helpers.joint_data(lit, instructions)
    for part in data.parts.values():
        assert part.tokenizer_path == Path(lit.data_settings.tokenizer_path) and part.style.name == "raw"
    assert data.parts["caption"].clip_model == helpers.TINY_CLIP_MODEL
    assert data.carries_images == {"instruction": False, "caption": True}
    with pytest.raises(LitAdapterError, match=r"data.caption.clip_model is set, but it comes from the model "
                                              r"\(model.adapter.visual.clip_model\): drop it from the data"):
        JointDataModule(caption=CaptionDataModule("builtin:demo", clip_model="ViT-B-32"),
                        model_settings=lit.data_settings)  # fmt: skip
    with pytest.raises(LitAdapterError, match="data.instruction: CaptionDataModule holds caption data"):
        JointDataModule(instruction=CaptionDataModule("builtin:demo"))


def test_validation_batches_name_their_source(stories260k_dir: Path, instructions: Path) -> None:
    lit = helpers.module(stories260k_dir)
    data = helpers.joint_data(lit, instructions)
    data.setup("fit")
    sources = [next(iter(loader))["source"] for loader in data.val_dataloader()]
    assert sources == ["instruction", "caption"]
