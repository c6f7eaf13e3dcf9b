"""Chat with a model and adapter (the V2 chat template; temperature 0.7, top-p 0.95); /image PATH, /reset, /exit.

    python generate/chat.py --checkpoint_dir checkpoints/llama-65b --adapter llama_adapter_v2_chat65b.pth

Every option of `lit-adapter chat` works here (`--help` lists them).
"""

import sys

from lit_adapter.cli import main

if __name__ == "__main__":
    main(["chat", *sys.argv[1:]])
