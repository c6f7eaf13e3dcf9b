"""LLaMA-Adapter V1 on Alpaca (the official recipe): `python finetune/adapter_v1.py [--trainer.devices 4 ...]`.

The same as `lit-adapter fit --config configs/llama7b_v1_alpaca.yaml`; any further argument overrides the config.
"""

import sys
from pathlib import Path

from lit_adapter.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "llama7b_v1_alpaca.yaml"

if __name__ == "__main__":
    main(["fit", "--config", str(CONFIG), *sys.argv[1:]])
