"""`execq logs ID [-f]`: a command's output as stored, or as the command produces it."""

from __future__ import annotations

import json
import sys
from typing import Annotated, TextIO

import typer

from producer import live
from producer.states import State, is_terminal
from workers.cli_show import open_producer
from workers.clikit import JsonOpt, handled

FollowOpt = Annotated[
    bool,
    typer.Option(
        "--follow",
        "-f",
        help="Print output as the command produces it and return when it ends: "
        "exit 0 if it succeeded, 1 otherwise.",
    ),
]


def _write(stream: TextIO, text: str | None) -> None:
    # Flushed each time: whoever reads the pipe sees a line when the command prints it.
    if text:
        stream.write(text)
        stream.flush()


@handled
def logs(
    command_id: Annotated[str, typer.Argument(metavar="ID")],
    follow: FollowOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Print a command's stdout and stderr (redacted); -f: as the command produces them.

    A command that ended shows its output as stored; a running one, what it printed so far.
    --json: the events (state, stdout, stderr, end), one JSON object a line.
    """
    with open_producer() as producer:
        if not follow and not as_json:
            rec = producer.get(command_id)
            if is_terminal(rec.state):
                _write(sys.stdout, rec.stdout)
                _write(sys.stderr, rec.stderr)
                return
        final: str | None = None
        try:
            for event in live.follow(producer, command_id, follow=follow):
                if as_json:
                    _write(sys.stdout, json.dumps(event.to_json()) + "\n")
                elif event.event in ("stdout", "stderr"):
                    text = json.loads(event.data)["text"]
                    _write(sys.stdout if event.event == "stdout" else sys.stderr, text)
                if event.event == "end":
                    final = json.loads(event.data)["state"]
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
    if follow and final != State.SUCCEEDED.value:
        raise typer.Exit(1)
