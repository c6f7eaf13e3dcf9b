"""Peak memory of `lit-adapter convert` against the size of the checkpoint it converts.

Builds a synthetic bf16 LLaMA checkpoint of about --size_gb (Meta: consolidated.00/01.pth + params.json; Hugging Face:
two safetensors shards + index), converts it with the real CLI in a child process (--dtype bfloat16, so no dtype
change hides or adds copies) and reports the child's peak resident set size (ru_maxrss, read per child with wait4)
as a ratio of the checkpoint size. A tiny checkpoint converted the same way gives the fixed cost of the interpreter,
torch and the CLI, reported separately. While the child runs, /proc is sampled to split the peak into anonymous
memory (the converted copy) and file-backed pages (the memory-mapped source).

    python benchmarks/convert_memory.py --size_gb 1 --formats meta hf
    python benchmarks/convert_memory.py --chunk_mb 0    # no chunking: all source pages stay mapped (the naive loader)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lit_adapter.checkpoint import expected_shapes  # noqa: E402
from lit_adapter.config import ModelConfig  # noqa: E402
from lit_adapter.convert.hf import hf_config_dict, to_hf_key  # noqa: E402
from lit_adapter.convert.meta import split_dim  # noqa: E402

GB = 1e9


def synthetic_config(size_gb: float, dim: int = 2048) -> ModelConfig:
    """A LLaMA shape (dim 2048, 16 heads, vocab 32000) with as many layers as it takes to reach size_gb in bf16."""
    base = ModelConfig(vocab_size=32000, dim=dim, n_layers=1, n_heads=16, multiple_of=256, max_seq_len=2048)
    per_layer = (4 * dim * dim + 3 * dim * base.hidden_dim + 2 * dim) * 2
    fixed = (2 * base.vocab_size * dim + dim) * 2
    layers = max(1, round((size_gb * GB - fixed) / per_layer))
    return ModelConfig.from_dict({**base.to_dict(), "n_layers": layers, "name": f"synthetic-{layers}L"})


def random_bf16(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)


def write_meta(folder: Path, config: ModelConfig, n_shards: int = 2) -> None:
    """Shard by shard (only one shard in memory), cut the way Meta cuts model-parallel checkpoints."""
    folder.mkdir(parents=True)
    params = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
              "multiple_of": config.multiple_of, "norm_eps": config.norm_eps, "vocab_size": -1}
    (folder / "params.json").write_text(json.dumps(params))
    generator = torch.Generator().manual_seed(0)
    for rank in range(n_shards):
        shard = {}
        for key, shape in expected_shapes(config).items():
            dim = split_dim(key)
            shape = list(shape)
            if dim is not None:
                shape[dim] //= n_shards
            replicated = dim is None  # norms: identical in every shard
            shard[key] = torch.ones(shape, dtype=torch.bfloat16) if replicated else random_bf16(tuple(shape), generator)
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
        del shard


def write_hf(folder: Path, config: ModelConfig, n_files: int = 2) -> None:
    """Two safetensors files split by layer, plus model.safetensors.index.json (as save_pretrained writes)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**hf_config_dict(config), "torch_dtype": "bfloat16"}))
    keys = list(expected_shapes(config).items())
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    per_file = -(-len(keys) // n_files)
    for index in range(n_files):
        name = f"model-{index + 1:05d}-of-{n_files:05d}.safetensors"
        chunk = keys[index * per_file:(index + 1) * per_file]
        part = {to_hf_key(key): random_bf16(shape, generator) for key, shape in chunk}
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        del part
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".pth", ".safetensors"))


def sample_rss(pid: int, peaks: dict[str, int], stop: threading.Event) -> None:
    """Keep the highest RssAnon / RssFile (kB) seen in /proc/PID/status."""
    while not stop.is_set():
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        except (OSError, ValueError):
            return
        for name in ("RssAnon", "RssFile"):
            if name in fields:
                peaks[name] = max(peaks.get(name, 0), int(fields[name].split()[0]))
        time.sleep(0.02)


def measure_convert(source: Path, out: Path, tokenizer: Path, chunk_mb: int | None) -> dict:
    """Run the CLI in a child; its peak RSS comes from wait4 (ru_maxrss, kB), its composition from /proc samples."""
    if chunk_mb is None:
        argv = [sys.executable, "-m", "lit_adapter.cli"]
    else:  # the same CLI with another chunk budget (0 = keep every source file mapped throughout)
        budget = chunk_mb * 2**20 if chunk_mb > 0 else 1 << 62
        code = (f"import lit_adapter.convert.files as f; f.CHUNK_BYTES = {budget}; "
                "from lit_adapter.cli import main; import sys; main(sys.argv[1:])")
        argv = [sys.executable, "-c", code]
    argv += ["convert", str(source), "--out_dir", str(out), "--tokenizer", str(tokenizer), "--dtype", "bfloat16"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peaks: dict[str, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(child.pid, peaks, stop), daemon=True)
    sampler.start()
    _, status, usage = os.wait4(child.pid, 0)
    stop.set()
    sampler.join()
    seconds = time.perf_counter() - start
    stdout, stderr = child.stdout.read().decode(), child.stderr.read().decode()
    child.stdout.close()
    child.stderr.close()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"convert failed ({child.returncode}): {stderr.strip() or stdout.strip()}")
    return {"peak_rss": usage.ru_maxrss * 1024, "anon": peaks.get("RssAnon", 0) * 1024,
            "file": peaks.get("RssFile", 0) * 1024, "seconds": seconds}


def check_output(out: Path, config: ModelConfig) -> None:
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(expected_shapes(config)), "converted keys differ from the expected ones"
        tensor = f.get_tensor("layers.0.attention.wq.weight")
        assert tensor.dtype == torch.bfloat16 and list(tensor.shape) == [config.dim, config.dim]


def preflight(work: Path, size_gb: float, formats: list[str]) -> None:
    free_disk = shutil.disk_usage(work).free
    available = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemAvailable"))) * 1024
    need_disk = 2.2 * size_gb * GB  # one source + its converted copy at a time
    print(f"work dir {work}: {free_disk / GB:.1f} GB free on disk, {available / GB:.1f} GB memory available")
    if free_disk < need_disk:
        raise SystemExit(f"need {need_disk / GB:.1f} GB of free disk in {work}; lower --size_gb or pick --work_dir")
    if available < 3 * size_gb * GB:
        raise SystemExit(f"need about {3 * size_gb:.1f} GB of available memory; lower --size_gb")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size_gb", type=float, default=1.0, help="checkpoint size to synthesise (bf16)")
    parser.add_argument("--formats", nargs="+", choices=["meta", "hf"], default=["meta", "hf"])
    parser.add_argument("--chunk_mb", type=int, default=None,
                        help="override the loader's chunk budget (MiB); 0 = no chunking; default: the loader's own")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="a SentencePiece model with <= 32000 pieces; default $LIT_ADAPTER_ASSETS/stories260K")
    parser.add_argument("--work_dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    tokenizer = args.tokenizer or Path(os.environ.get("LIT_ADAPTER_ASSETS", "")) / "stories260K" / "tok512.model"
    if not tokenizer.is_file():
        raise SystemExit("pass --tokenizer FILE or set LIT_ADAPTER_ASSETS (any SentencePiece model of <= 32000 pieces)")
    preflight(args.work_dir, args.size_gb, args.formats)
    work = Path(tempfile.mkdtemp(prefix="convert-memory-", dir=args.work_dir))
    try:
        tiny = synthetic_config(0.0, dim=256)
        write_meta(work / "tiny", tiny)
        baseline = measure_convert(work / "tiny", work / "tiny-out", tokenizer, args.chunk_mb)["peak_rss"]
        print(f"fixed cost (a {folder_bytes(work / 'tiny') / 1e6:.0f} MB checkpoint): peak RSS {baseline / GB:.2f} GB")
        config = synthetic_config(args.size_gb)
        for fmt in args.formats:
            source, out = work / fmt, work / f"{fmt}-out"
            (write_meta if fmt == "meta" else write_hf)(source, config)
            size = folder_bytes(source)
            result = measure_convert(source, out, tokenizer, args.chunk_mb)
            check_output(out, config)
            print(
                f"{fmt:>4}: checkpoint {size / GB:.2f} GB ({config.n_layers} layers, 2 shards) -> peak RSS "
                f"{result['peak_rss'] / GB:.2f} GB = {result['peak_rss'] / size:.2f}x the checkpoint; "
                f"above the fixed cost {(result['peak_rss'] - baseline) / size:.2f}x "
                f"(sampled peaks: anonymous {result['anon'] / GB:.2f} GB, file-backed {result['file'] / GB:.2f} GB); "
                f"{result['seconds']:.1f} s"
            )
            shutil.rmtree(source)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
