"""The one error type for every user-facing failure: the CLI prints its message on one line and exits 2.

Also the helpers that turn foreign errors into such a line: `first_line` (any exception) and `torch_load_problem`
(what `torch.load(..., weights_only=True)` refused, without torch's advice to load the file unsafely).
"""

from __future__ import annotations

import re
from typing import Optional

# set to 1 to see the full traceback of an unexpected error instead of its one-line summary
DEBUG_ENV = "LIT_ADAPTER_DEBUG"


class LitAdapterError(Exception):
    """A problem with the user's input (a file, a record, a setting) that the message explains."""


class EveryRankError(LitAdapterError):
    """An error every process of a distributed run raises at once, from a check they take together (the non-finite
    guard's): only global rank 0 prints it, so the line appears once."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): foreign libraries' errors
    often run over several lines, and ours are one line."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# torch's refusals name what the pickle asked for; its message also advises `weights_only=False`, which would run
# whatever code the file names: that advice is never repeated
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")
_BLOCKED_MODULE = re.compile(r"unsupported GLOBAL (\S+) whose module")
_UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error:\s*(.+)")


def torch_load_problem(err: BaseException) -> str:
    """What went wrong in `torch.load(path, weights_only=True)`, as a phrase for "PATH: <phrase>"."""
    text = str(err)
    refused = _REFUSED_GLOBAL.search(text) or _BLOCKED_MODULE.search(text)
    if refused:
        return (f"refused to load: not a plain tensor checkpoint (it asks for {refused[1]}, which a file of weights "
                "never needs; loading it anyway could run code from it)")
    detail = _UNPICKLER_DETAIL.search(text)
    if "Weights only load failed" in text:  # the safe loader stopped at something it does not know
        what = detail[1].strip().rstrip(".") if detail else "something other than tensors"
        return f"cannot read as a torch checkpoint: the safe loader refused it ({what}): not a plain tensor checkpoint"
    lowered = text.lower()
    if any(sign in lowered for sign in ("central directory", "eof", "truncat", "streamreader", "zip archive")):
        return f"cannot read as a torch checkpoint: truncated or corrupt ({first_line(err).split('. ')[0]})"
    return f"cannot read as a torch checkpoint ({first_line(err)})"


def user_error_in(err: Optional[BaseException]) -> Optional[LitAdapterError]:
    """A LitAdapterError that `err` was raised from (libraries such as jsonargparse wrap the errors of the code they
    call), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, LitAdapterError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
