"""`python -m omni.train --config FILE [key=value ...]`: the entry point for torchrun and deepspeed."""

import sys

from omni.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
