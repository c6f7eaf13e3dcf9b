"""ScienceQA evaluation: `python eval/scienceqa.py --data_dir ... --checkpoint_dir ... [--adapter ...]`.

The same as `lit-adapter eval scienceqa ...`; see `--help` for every option.
"""

import sys

from lit_adapter.cli import main

if __name__ == "__main__":
    main(["eval", "scienceqa", *sys.argv[1:]])
