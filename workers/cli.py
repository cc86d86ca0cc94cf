"""`execq`'s entry point: the command tree is imported here, so that a Ctrl-C while it loads
ends as quietly as one while a command runs (one line, exit status 130, no traceback)."""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import Any

INTERRUPTED = 130


def _quit_loading(_signum: int, _frame: FrameType | None) -> None:
    # Nothing has started yet: no file or connection to close, and a KeyboardInterrupt
    # raised inside an import can surface as another error (or a traceback) on the way out.
    os.write(2, b"interrupted\n")
    os._exit(INTERRUPTED)


def _quit_exiting(_signum: int, _frame: FrameType | None) -> None:
    # The command is done and said so; only the interpreter's clean-up remains.
    os._exit(INTERRUPTED)


def main() -> None:
    """Console-script entry (`execq`, `python -m workers.cli`)."""
    signal.signal(signal.SIGINT, _quit_loading)
    from workers.cli_app import run  # noqa: PLC0415

    # From here Ctrl-C is a KeyboardInterrupt: each command says what it leaves running.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED)
    finally:
        signal.signal(signal.SIGINT, _quit_exiting)


def __getattr__(name: str) -> Any:
    # `from workers.cli import app`: the Typer app, loaded on first use.
    if name == "app":
        from workers.cli_app import app  # noqa: PLC0415

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
