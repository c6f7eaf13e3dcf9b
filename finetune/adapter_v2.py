"""LLaMA-Adapter V2 joint training (paper): `python finetune/adapter_v2.py [--config configs/llama13b_v2_fsdp.yaml]`.

The same as `lit-adapter fit --config configs/llama7b_v2_joint.yaml`; a later --config or any other argument
overrides it.
"""

import sys
from pathlib import Path

from lit_adapter.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "llama7b_v2_joint.yaml"

if __name__ == "__main__":
    main(["fit", "--config", str(CONFIG), *sys.argv[1:]])
