"""lm-evaluation-harness over our inference engine: `EngineLM` is an lm-eval `LM` (loglikelihood,
loglikelihood_rolling, generate_until), so any lm-eval task runs on a base model or on an adapter model, prefix
adapters included (which no Hugging Face model can run).

Requests are tokenized and cut as lm-eval's own `hf` model does it (its defaults: BOS where the tokenizer adds one
by default, the empty context replaced by the prefix token, the last `max_length + 1` tokens scored, the context of
a generation left-truncated to leave room for `max_gen_toks`, stop sequences and the end token ending it), so the
same weights give the same numbers through either.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

from lit_adapter.errors import LitAdapterError


def batches(items: Sequence, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield list(items[start: start + size])


class EngineLM(TemplateLM):
    """An lm-eval language model answering through an `Engine` (see the module docstring).

    Args:
        engine: the loaded model (`Engine.load`: base or adapter model, folded as `generate` runs it).
        batch_size: requests scored or decoded together.
        max_gen_toks: the most new tokens of a generation, unless the task sets its own.
        add_bos_token: True / False: BOS before every context or never; None: where the tokenizer puts it by
            default (as lm-eval's `hf` model).
    """

    def __init__(self, engine, batch_size: int = 8, max_gen_toks: int = 256,
                 add_bos_token: Optional[bool] = None) -> None:
        super().__init__()
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self.add_bos_token = add_bos_token

    @property
    def eot_token_id(self) -> int:
        if self.tokenizer.eos_id is None:
            raise LitAdapterError(f"{self.tokenizer.path}: the tokenizer has no end token, which lm-eval needs")
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What stands before a continuation with an empty context: BOS, else the end token (as lm-eval's hf)."""
        bos = self.tokenizer.token_id(self.tokenizer.special_tokens["bos_token"]) if (
            "bos_token" in self.tokenizer.special_tokens) else None
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.engine.context_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                   left_truncate_len: Optional[int] = None, **kwargs: Any) -> list[int]:
        """Token ids as lm-eval's hf model encodes them: BOS where the tokenizer puts one by default (or as
        `add_bos_token` says), none when lm-eval asks for no special tokens or the text starts with BOS's text."""
        bos = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        bos_text = self.tokenizer.special_tokens.get("bos_token")
        if add_special_tokens is None and bos_text and string.startswith(bos_text):
            bos = False
        ids = self.tokenizer.encode(string, bos=True if bos is None else bos)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Iterable[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per request."""
        results = []
        for group in batches(requests, self.batch_size):
            rows, lengths = [], []
            for _, context, continuation in group:
                rows.append((context + continuation)[-(self.max_length + 1):][:-1])
                lengths.append(len(continuation))
            results += self._score(rows, [continuation for _, _, continuation in group], lengths)
        return results

    def _score(self, rows: list[list[int]], targets: list[list[int]], lengths: list[int]) -> list[tuple[float, bool]]:
        engine = self.engine
        width = max(len(row) for row in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long, device=engine.device)
        for i, row in enumerate(rows):  # right padding: causal attention keeps it out of every scored position
            tokens[i, : len(row)] = torch.tensor(row, device=engine.device)
        with engine.cpu:
            logits = engine.llama(tokens).float()
        out = []
        for i, (row, target, length) in enumerate(zip(rows, targets, lengths, strict=True)):
            log_probs = torch.log_softmax(logits[i, len(row) - length: len(row)], dim=-1)
            wanted = torch.tensor(target[-length:], device=engine.device)
            greedy = bool(torch.equal(log_probs.argmax(dim=-1), wanted))
            out.append((float(log_probs.gather(-1, wanted[:, None]).sum()), greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of whole texts, in disjoint windows of the model's context (perplexity tasks)."""
        totals = []
        for request in requests:
            (text,) = request.args
            windows = [(None, *lm_utils.make_disjoint_window(window)) for window in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            scores = self._loglikelihood_tokens(windows)
            totals.append(sum(score for score, _ in scores))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), totals[-1])
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first stop sequence (the task's `until` and the end token's text);
        requests with the same settings are decoded together, `batch_size` at a time."""
        from lit_adapter.inference.engine import Decoding

        prepared = []
        for request in requests:
            context, settings = request.args
            settings = dict(settings or {})
            until = settings.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            end = self.tokenizer.special_tokens.get("eos_token")  # lm-eval's hf adds the end token's text too
            if end and end not in until:
                until.append(end)
            if settings.get("do_sample") or float(settings.get("temperature", 0.0) or 0.0) > 0:
                raise LitAdapterError("lm-eval asked for sampled generations; only greedy decoding (do_sample false, "
                                      "temperature 0) is run")
            max_new = int(settings.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context, left_truncate_len=self.max_length - max_new)
            prepared.append((ids, Decoding(max_new_tokens=max_new, temperature=0.0, stop=tuple(u for u in until if u))))
        answers: list[str] = [""] * len(prepared)
        groups: dict[Decoding, list[int]] = {}
        for index, (_, decoding) in enumerate(prepared):
            groups.setdefault(decoding, []).append(index)
        for decoding, indices in groups.items():
            for chunk in batches(indices, self.batch_size):
                prompts = [torch.tensor(prepared[i][0], device=self.engine.device) for i in chunk]
                for i, new in zip(chunk, self.engine.generate_batch(prompts, decoding), strict=True):
                    text = self.tok_decode(new)
                    for stop in decoding.stop:
                        text = text.split(stop)[0]
                    answers[i] = text
        for request, text in zip(requests, answers, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return answers


def task_names(tasks: str) -> tuple[list[str], list[str], bool]:
    """`--tasks T1,T2` -> (task names, folders of local task YAML files to include, whether a name is not a file):
    an entry that is a .yaml file stands for the task it defines."""
    import yaml

    names, folders, registry = [], [], False
    for entry in (part.strip() for part in tasks.split(",")):
        if not entry:
            continue
        path = Path(entry)
        if path.suffix in (".yaml", ".yml") and path.is_file():
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or not isinstance(data.get("task"), str):
                raise LitAdapterError(f"{path}: a task YAML needs a `task: NAME` entry")
            names.append(data["task"])
            folders.append(str(path.resolve().parent))
        else:
            names.append(entry)
            registry = True
    if not names:
        raise LitAdapterError("--tasks: name at least one lm-eval task (or a task YAML file)")
    return names, sorted(set(folders)), registry


def evaluate(lm, tasks: str, num_fewshot: Optional[int] = None, limit: Optional[float] = None,
             include_path: Optional[Path] = None, seed: int = 0) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of `lm` on `tasks` (registry names or local task YAML files)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names, folders, registry = task_names(tasks)
    if include_path is not None:
        folders.append(str(Path(include_path).resolve()))
        registry = True  # a name may stand for a task of that folder or of the registry
    # indexing lm-eval's own registry reads thousands of YAML files (a minute): only when a task is named from it
    manager = TaskManager(include_path=folders or None, include_defaults=registry)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise LitAdapterError(f"--tasks: unknown lm-eval task {unknown[0]!r}; name a registered task or pass a task "
                              "YAML file (or its folder with --include_path)")
    return simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                           random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                           fewshot_random_seed=seed)


def results_json(results: dict[str, Any]) -> str:
    return json.dumps(results, indent=2, default=lm_utils.handle_non_serializable, ensure_ascii=False)
