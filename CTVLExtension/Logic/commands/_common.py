"""Shared pieces of the inference subcommands: model/device options and a tqdm progress bar on stderr."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="demo", help="weights: 'demo' (embedded) or an exported weights directory")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run the model")


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Callable[[float, str], None]]:
    """A ``progress(fraction, message)`` callback drawing a tqdm bar on stderr (no-op when disabled)."""
    if not enabled:
        yield lambda _f, _m: None
        return
    from tqdm import tqdm

    bar = tqdm(total=100, file=sys.stderr, unit="%", leave=False, disable=None,  # no bar when not a TTY
               bar_format="{desc:<28.28} {percentage:3.0f}%|{bar}| {elapsed}")

    def update(fraction: float, message: str) -> None:
        bar.set_description_str(message, refresh=False)
        bar.n = round(100 * min(max(fraction, 0.0), 1.0))
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()
