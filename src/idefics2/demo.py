"""`python -m idefics2.demo`: the README's demo (same as `idefics2 demo`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
