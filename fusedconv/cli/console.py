"""Console output of the commands: rich when installed and writing to a terminal, plain text otherwise."""

from __future__ import annotations

import contextlib
import sys


class Printer:
    """rich when installed and writing to a terminal, plain text otherwise."""

    def __init__(self):
        self.console = None
        if sys.stdout.isatty():
            try:
                from rich.console import Console

                self.console = Console(highlight=False)
            except ImportError:
                pass

    def heading(self, text: str) -> None:
        if self.console is not None:
            self.console.rule(f"[bold]{text}")
        else:
            print(f"== {text}")

    def line(self, text: str = "") -> None:
        if self.console is not None:
            self.console.print(text, markup=False)
        else:
            print(text)

    def status(self, text: str):
        if self.console is not None:
            return self.console.status(text)
        print(f"{text} ...", flush=True)
        return contextlib.nullcontext()
