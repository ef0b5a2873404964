"""`python -m idefics2.training finetune|merge-lora ...` (the same subcommands as `idefics2 ...`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .cli import register


def main(argv: Sequence[str] | None = None) -> int:
    from ..checkpoint import CheckpointError
    from ..cli import UserError
    from ..config import ConfigError

    parser = argparse.ArgumentParser(prog="idefics2", description="Fine-tune Idefics2.")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UserError, CheckpointError, ConfigError) as e:
        print(f"idefics2: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
