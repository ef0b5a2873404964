"""`python -m idefics2.training ...`: the same command as `idefics2 ...` (handy as `torchrun -m idefics2.training`)."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main())
