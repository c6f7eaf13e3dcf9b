"""Joint training data: instruction and caption batches alternating in one loop, resumable mid-epoch.

`ResumableLoader` decides the whole epoch up front (seeded by seed + epoch, identical on every rank, each rank taking
its own shard), so its state is just (epoch, batches consumed): a resumed run rebuilds the same epoch and continues
with the next batch. Lightning saves that state in every checkpoint (`state_dict` / `load_state_dict`) and restores it
before iterating. The loader has a length, so Lightning does not prefetch ahead of the training step and the count is
exactly the number of batches trained on.

Batches of one source come in blocks of `accumulate_grad_batches` micro-batches so that an optimizer step only ever
accumulates gradients of one source: each step then updates exactly one parameter group (see `LitAdapterModule`).
Every batch, training and validation, carries its source name under `"source"` (a `TrainingBatch`).

The data modules take the model's tokenizer, context length, image transform and prompt style from `DataSettings`
handed over once (`lit-adapter fit` links `model.data_settings` to `data.model_settings`); the data never looks at the
model, nor the model at the data.

Random augmentation (e.g. the caption images' random crops) is a function of (seed, source, epoch, position): each
sample is loaded under its own torch seed, so a resumed run, or one with a different number of workers, sees the very
same crops.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lit_adapter.data.base import DataSettings, TokenizedDataModule
from lit_adapter.data.batch import CAPTION, INSTRUCTION
from lit_adapter.errors import LitAdapterError

__all__ = ["CAPTION", "INSTRUCTION", "JointDataModule", "ResumableLoader", "Source"]


@dataclass
class Source:
    """One training set: its dataset, collate function, batch size and (optionally) its own deterministic sampler."""

    name: str
    dataset: Dataset
    collate_fn: Optional[Callable]
    batch_size: int
    sampler: Optional[Any] = None  # an object with set_epoch() and __iter__ (e.g. a length-grouped sampler)
    num_workers: int = 0

    def order(self, seed: int, epoch: int) -> list[int]:
        """The epoch's order of dataset indices (same on every rank)."""
        if self.sampler is not None and callable(getattr(self.sampler, "set_epoch", None)):
            self.sampler.set_epoch(epoch)
            return list(self.sampler)
        generator = torch.Generator().manual_seed(seed + epoch)
        return torch.randperm(len(self.dataset), generator=generator).tolist()  # type: ignore[arg-type]

    def batches(self, seed: int, epoch: int, rank: int, world_size: int) -> list[list[tuple[int, int]]]:
        """This rank's full batches of the epoch as (index, sample seed) pairs (the remainder that does not fill a
        batch on every rank is dropped)."""
        order = [(index, sample_seed(seed, self.name, epoch, i)) for i, index in enumerate(self.order(seed, epoch))]
        per_rank = len(order) // world_size
        shard = order[rank * per_rank : (rank + 1) * per_rank] if world_size > 1 else order
        return [shard[i : i + self.batch_size] for i in range(0, len(shard) - self.batch_size + 1, self.batch_size)]

    def num_batches(self, world_size: int) -> int:
        return (len(self.dataset) // world_size) // self.batch_size  # type: ignore[arg-type]


def sample_seed(seed: int, source: str, epoch: int, position: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{source}:{epoch}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededSamples(Dataset):
    """Items are (index, seed): the sample at `index`, loaded with torch's RNG seeded by `seed` (then restored)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def source_pattern(steps: dict[str, int], block: int) -> list[str]:
    """One cycle of the alternation in micro-batches, e.g. {instruction: 2, caption: 1}, block 2 -> I I I I C C."""
    return [name for name, count in steps.items() for _ in range(count * block)]


class ResumableLoader:
    """Yields the batches of one or more sources in a fixed pattern; resumable mid-epoch; shards across ranks.

    With one source every batch of the epoch is used. With several, the epoch is the largest number of whole pattern
    cycles every source can fill; the remainder of the larger sources is reshuffled into the next epochs.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        steps: Optional[dict[str, int]] = None,
        block: int = 1,
        seed: int = 42,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not sources:
            raise LitAdapterError("no training data: configure an instruction and/or a caption data set")
        self.sources = {source.name: source for source in sources}
        steps = steps or {name: 1 for name in self.sources}
        self.pattern = source_pattern({name: steps[name] for name in self.sources}, block)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.consumed = 0, 0
        for source in sources:
            if source.num_batches(world_size) == 0:
                raise LitAdapterError(
                    f"{source.name} data: {len(source.dataset)} training examples cannot fill one batch of "  # type: ignore[arg-type]
                    f"{source.batch_size} on each of {world_size} processes; lower the batch size or add data"
                )
        if len(self) == 0:
            raise LitAdapterError(
                f"training data too small for one alternation cycle of {len(self.pattern)} batches "
                f"({', '.join(f'{n}: {s.num_batches(world_size)} batches' for n, s in self.sources.items())})"
            )

    def __len__(self) -> int:
        if len(self.sources) == 1:
            return next(iter(self.sources.values())).num_batches(self.world_size)
        cycles = min(
            source.num_batches(self.world_size) // self.pattern.count(name) for name, source in self.sources.items()
        )
        return cycles * len(self.pattern)

    def schedule(self, epoch: int) -> list[tuple[str, list[tuple[int, int]]]]:
        """The epoch's micro-batches in order: (source name, [(dataset index, sample seed), ...])."""
        batches = {name: s.batches(self.seed, epoch, self.rank, self.world_size) for name, s in self.sources.items()}
        taken = {name: 0 for name in self.sources}
        plan = []
        for i in range(len(self)):
            name = self.pattern[i % len(self.pattern)]
            plan.append((name, batches[name][taken[name]]))
            taken[name] += 1
        return plan

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.consumed >= len(self):  # the previous epoch ran to its end
            self.epoch, self.consumed = self.epoch + 1, 0
        plan = self.schedule(self.epoch)[self.consumed :]
        iterators = {name: iter(self._loader(name, [ids for n, ids in plan if n == name])) for name in self.sources}
        return self._batches(plan, iterators)

    def _batches(self, plan: list[tuple[str, list[tuple[int, int]]]], iterators: dict[str, Iterator]) -> Iterator[dict]:
        for name, _ in plan:
            batch = next(iterators[name])
            self.consumed += 1
            yield {**batch, "source": name}
        self.epoch, self.consumed = self.epoch + 1, 0

    def _loader(self, name: str, batches: list[list[tuple[int, int]]]) -> DataLoader:
        source = self.sources[name]
        return DataLoader(
            SeededSamples(source.dataset),
            batch_sampler=batches,
            collate_fn=source.collate_fn,
            num_workers=source.num_workers,
            generator=torch.Generator().manual_seed(self.seed),  # worker seeds without touching the global RNG
        )

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


def source_from_loader(name: str, loader: DataLoader, fallback_batch_size: Optional[int] = None) -> Source:
    """Take a data module's training DataLoader apart into a `Source` (its dataset, collate, batch size, sampler)."""
    batch_size = loader.batch_size or fallback_batch_size
    if batch_size is None:
        raise LitAdapterError(f"{name} data: cannot tell the batch size of its training loader; set batch_size")
    sampler = loader.sampler if callable(getattr(loader.sampler, "set_epoch", None)) else None
    batch_sampler = getattr(loader, "batch_sampler", None)
    if sampler is None and batch_sampler is not None:
        inner = getattr(batch_sampler, "sampler", None)
        sampler = inner if callable(getattr(inner, "set_epoch", None)) else None
    return Source(name, loader.dataset, loader.collate_fn, batch_size, sampler, loader.num_workers)


class JointDataModule(LightningDataModule):
    """Training data for `lit-adapter fit`: instruction data, caption data, or both alternating (joint training).

    Args:
        instruction: the instruction data module (e.g. InstructionDataModule, ScienceQADataModule); None = none
        caption: the image-caption data module (CaptionDataModule); None = none
        instruction_steps: per alternation cycle, this many optimizer steps on instruction batches ...
        caption_steps: ... followed by this many on caption batches (e.g. 2 and 1: two instruction steps per
            caption step)
        seed: seed of the per-epoch shuffling (each epoch uses seed + epoch)
        model_settings: the trained model's tokenizer, context length, image transform and prompt style, handed to
            every data module (`lit-adapter fit` links it from the model); None = each module's own
    """

    def __init__(
        self,
        instruction: Optional[TokenizedDataModule] = None,
        caption: Optional[TokenizedDataModule] = None,
        instruction_steps: int = 1,
        caption_steps: int = 1,
        seed: int = 42,
        model_settings: Optional[DataSettings] = None,
    ) -> None:
        super().__init__()
        if instruction is None and caption is None:
            raise LitAdapterError("data: configure `instruction`, `caption` or both")
        if instruction_steps < 1 or caption_steps < 1:
            raise LitAdapterError(f"instruction_steps and caption_steps must be >= 1 (got {instruction_steps}, "
                                  f"{caption_steps})")
        self.parts = {name: dm for name, dm in ((INSTRUCTION, instruction), (CAPTION, caption)) if dm is not None}
        for name, part in self.parts.items():
            if part.source != name:
                raise LitAdapterError(f"data.{name}: {type(part).__name__} holds {part.source} data; move it to "
                                      f"data.{part.source}")
        self.steps = {INSTRUCTION: instruction_steps, CAPTION: caption_steps}
        self.seed = seed
        self._train_loader: Optional[ResumableLoader] = None
        if model_settings is not None:
            self.connect_model(model_settings)

    @property
    def carries_images(self) -> dict[str, bool]:
        """Per source: whether its batches hold images (captions always; instruction data with an image folder)."""
        return {name: part.carries_images for name, part in self.parts.items()}

    def connect_model(self, settings: DataSettings) -> None:
        """Hand the model's settings to every data module; image data needs a model with a visual encoder."""
        for name, part in self.parts.items():
            if part.carries_images and settings.clip_model is None:
                if name == CAPTION:
                    raise LitAdapterError("caption data needs a visual encoder: set model.adapter.visual (a "
                                          "VisualConfig)")
                raise LitAdapterError(f"data.{name}.image_dir is set but the adapter has no visual encoder: set "
                                      "model.adapter.visual (a VisualConfig) or drop image_dir")
            part.connect_model(settings, name)

    def prepare_data(self) -> None:
        for part in self.parts.values():
            part.prepare_data()

    def setup(self, stage: Optional[str] = None) -> None:
        for part in self.parts.values():
            part.setup(stage)

    def train_dataloader(self) -> ResumableLoader:
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        block = trainer.accumulate_grad_batches if trainer is not None else 1
        sources = [
            source_from_loader(name, part.train_dataloader(), part.batch_size) for name, part in self.parts.items()
        ]
        self._train_loader = ResumableLoader(sources, self.steps, block, self.seed, rank, world_size)
        return self._train_loader

    def val_dataloader(self) -> list[DataLoader]:
        """Each source's validation loader (its batches name their source), sources without validation data left
        out."""
        loaders = [part.val_dataloader() for part in self.parts.values()]
        return [loader for loader in loaders if isinstance(loader, DataLoader) and len(loader.dataset) > 0]  # type: ignore[arg-type]
