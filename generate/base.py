"""Generate with the bare base model (no prompt template, greedy by default).

    python generate/base.py --checkpoint_dir checkpoints/stories260K --prompt "Once upon a time"

Every option of `lit-adapter generate` works here (`--help` lists them).
"""

import sys

from lit_adapter.cli import main

if __name__ == "__main__":
    main(["generate", *sys.argv[1:]])
