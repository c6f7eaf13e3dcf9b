"""Wall time of a whole short generation, as a user starts it: `lit-adapter generate` against transformers.

Each run is a fresh process (interpreter start, imports, model load, decoding `--max_new_tokens` greedy tokens,
exit), timed from outside, the runs interleaved round by round so that a busy moment hits all of them alike:

- ours: `lit-adapter generate --checkpoint_dir C --prompt P` (the base model);
- ours_adapter: the same with `--adapter A` (when given);
- transformers: `AutoModelForCausalLM` + `AutoTokenizer` on the same weights (our `lit-adapter export --format hf`
  of C), `generate(do_sample=False)`, the text printed;
- import_torch: `python -c "import torch"` ended at once, the floor every run above stands on.

The base texts must agree (both greedy on the same weights). Figures: the median wall seconds per run and the
ratio transformers / ours (above 1: ours starts and finishes sooner).

    python -m benchmarks.startup --checkpoint_dir ~/.cache/lit-adapter/stories260K --adapter out/demo
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from benchmarks import harness

PEER = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompt, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
ids = tokenizer(prompt, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=new, do_sample=False)
print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
"""
FLOOR = "import os, torch; os._exit(0)"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", type=Path, required=True, help="our checkpoint folder (the base model)")
    parser.add_argument("--adapter", type=Path, default=None, help="also time `generate --adapter ADAPTER`")
    parser.add_argument("--prompt", default="Write a story about a girl named Mia who likes kites.")
    parser.add_argument("--max_new_tokens", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5, help="runs of each kind, interleaved")
    parser.add_argument("--wait_idle", type=float, default=30, help="seconds to wait for idle CPUs first")
    parser.add_argument("--json", default=None, help="also write the report here")
    return parser.parse_args(argv)


def commands(args: argparse.Namespace, hf_dir: Path) -> dict[str, list[str]]:
    script = str(Path(sys.executable).with_name("lit-adapter"))
    ours = [script, "generate", "--checkpoint_dir", str(args.checkpoint_dir), "--prompt", args.prompt,
            "--max_new_tokens", str(args.max_new_tokens), "--temperature", "0"]  # fmt: skip
    runs = {"ours": ours}
    if args.adapter is not None:
        runs["ours_adapter"] = [*ours, "--adapter", str(args.adapter)]
    runs["transformers"] = [sys.executable, "-c", PEER, str(hf_dir), args.prompt, str(args.max_new_tokens)]
    runs["import_torch"] = [sys.executable, "-c", FLOOR]
    return runs


def timed(command: list[str]) -> tuple[float, str]:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed: {result.stderr[-2000:]}")
    return seconds, result.stdout


def export_hf(checkpoint_dir: Path, out_dir: Path) -> Path:
    script = str(Path(sys.executable).with_name("lit-adapter"))
    subprocess.run([script, "export", "--checkpoint_dir", str(checkpoint_dir), "--format", "hf", "--out_dir",
                    str(out_dir)], check=True, capture_output=True, timeout=600)  # fmt: skip
    return out_dir


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as scratch:
        runs = commands(args, export_hf(args.checkpoint_dir, Path(scratch) / "hf"))
        machine = harness.machine_info()
        busy = harness.wait_until_idle(args.wait_idle)
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        texts: dict[str, str] = {}
        for _ in range(args.rounds):
            for name, command in runs.items():
                took, out = timed(command)
                seconds[name].append(took)
                texts[name] = out
    if texts["ours"].strip() != texts["transformers"].strip():
        raise SystemExit(f"the greedy texts differ:\nours: {texts['ours']!r}\ntransformers: {texts['transformers']!r}")
    medians = {name: harness.median(values) for name, values in seconds.items()}
    rows = [{"run": name, "median_s": medians[name], "min_s": min(values), "max_s": max(values)}
            for name, values in seconds.items()]
    speed = harness.ratio(medians["transformers"], medians["ours"])
    print(harness.format_table(rows, [("run", "run", str), ("median_s", "median s", harness.fmt_number(2)),
                                      ("min_s", "min s", harness.fmt_number(2)),
                                      ("max_s", "max s", harness.fmt_number(2))]))
    print(f"\ntransformers / ours (whole base-model run): {harness.fmt_ratio(speed)}; the base texts agree")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, busy {busy:.0%} before, load average "
          f"{machine['load_average']}")
    if args.json:
        report = {"benchmark": "startup", "machine": machine, "seconds": seconds, "medians": medians,
                  "transformers_over_ours": speed, "texts_agree": True}
        harness.write_json(Path(args.json), report)
        print(json.dumps({"written": args.json}))


if __name__ == "__main__":
    main()
