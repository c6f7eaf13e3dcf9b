"""The CPU demo (stories260K + built-in data, V2 joint training, a few minutes): `python finetune/demo.py`.

The same as `lit-adapter fit --config configs/demo.yaml`; any further argument overrides the config.
"""

import sys
from pathlib import Path

from lit_adapter.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

if __name__ == "__main__":
    main(["fit", "--config", str(CONFIG), *sys.argv[1:]])
