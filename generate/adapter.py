"""Generate with an adapter (V1, V2, multimodal; ours or an official file): its prompt template is applied and the
paper's decoding (temperature 0.1, top-p 0.75) is the default.

    python generate/adapter.py --checkpoint_dir checkpoints/llama-7b --adapter out/adapter_v2 \
        --prompt "Describe this image." --image cat.jpg
    python generate/adapter.py --checkpoint_dir checkpoints/llama-7b --adapter out/adapter_v1 \
        --prompts_file prompts.jsonl --output_file answers.jsonl

Every option of `lit-adapter generate` works here (`--help` lists them).
"""

import sys

from lit_adapter.cli import main

if __name__ == "__main__":
    main(["generate", *sys.argv[1:]])
