"""`ctvl` command line: `ctvl analyze | locate | mine | phantom | info`.

Each subcommand lives in `ctvl.commands.<name>` with ``add_parser(subparsers)`` and ``run(args) -> int``.
Deliberate errors (`CTVLError`) become one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ctvl.allocator import retain_freed_memory
from ctvl.errors import CTVLCancelled, CTVLError

SUBCOMMANDS = ("analyze", "locate", "info", "mine", "phantom")


def build_parser() -> argparse.ArgumentParser:
    from ctvl import __version__

    parser = argparse.ArgumentParser(prog="ctvl", description="3D chest-CT vision-language tools.")
    parser.add_argument("--version", action="version", version=f"ctvl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"ctvl.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("ctvl.commands"):
                continue  # subcommand not built yet
            raise
        module.add_parser(sub)
    return parser



def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    retain_freed_memory()  # a short-lived process: reuse freed buffers instead of faulting in new pages
    try:
        return int(args.run(args) or 0)
    except CTVLCancelled:
        print("ctvl: cancelled", file=sys.stderr)
        return 130
    except CTVLError as exc:
        print(f"ctvl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ctvl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
