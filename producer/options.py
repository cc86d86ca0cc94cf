"""Matching denied options in an argv, in every spelling the program could accept.

A tenant's `deny_options` writes each option once (`--recursive`, `-r`, `-exec`); a caller can
spell it many ways (`--rec`, `--recursive=yes`, `-vrf`, `tar cIf …`, options after operands).
The matcher errs on the side of refusing: a false refusal costs a rewritten command, a miss
runs what the tenant meant to forbid.

Rules, for `args` = argv[1:]:

- A lone `--` ends options; later arguments are operands, except that single-dash words (find's
  `-exec`) are matched anywhere, since find reads its expression after the paths. A lone `-` is
  an operand. Options may follow operands (GNU getopt permutes), so every argument before `--`
  is scanned.
- `--name` and `--name=value` match a denied long option when `name` is it or any prefix of it
  (getopt_long takes unambiguous prefixes, and which are unambiguous depends on options we do
  not know), and a denied single-dash word spelled with two dashes (OpenSSL takes both).
- `-abc` is a bundle of short options: any of its characters matching a denied short option
  counts, as a later letter may be an earlier one's attached value or not. Its text before `=`
  matches a denied long option as `--` would when two or more characters long
  (getopt_long_only), and a denied single-dash word when equal to it.
- With `old_style_first` (tar, ps, ar), a first argument without a leading `-` is a bundle of
  short options (`tar cIf prog …`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Longer arguments are cut in messages, which should stay one readable line.
_SHOWN_CHARS = 60


@dataclass(frozen=True)
class OptionHit:
    """A denied option found in an argv: which spelling, where, and as which entry."""

    option: str  # the denied entry as the tenants file writes it: "--recursive", "-r", "-exec"
    argument: str  # the argument that spells it: "-vrf", "--rec=yes"
    index: int  # its index in the args given (argv[1:], so argv[index + 1])


@dataclass(frozen=True)
class _Denied:
    """The denied entries split by kind: long names, short characters, single-dash words."""

    longs: tuple[str, ...]  # without the leading "--"
    shorts: dict[str, str]  # character -> entry
    words: dict[str, str]  # word without its dash -> entry

    @classmethod
    def of(cls, denied: Sequence[str]) -> _Denied:
        longs: list[str] = []
        shorts: dict[str, str] = {}
        words: dict[str, str] = {}
        for entry in denied:
            if entry.startswith("--"):
                if len(entry) > 2:
                    longs.append(entry[2:])
            elif entry.startswith("-") and len(entry) == 2:
                shorts.setdefault(entry[1], entry)
            elif entry.startswith("-") and len(entry) > 2:
                words.setdefault(entry[1:], entry)
        return cls(tuple(longs), shorts, words)

    def long_prefixed_by(self, name: str) -> str | None:
        """The first denied long option that `name` spells in full or as a prefix."""
        for long in self.longs:
            if long.startswith(name):
                return f"--{long}"
        return None

    def short_in(self, bundle: str) -> str | None:
        """The denied short option of the first character of `bundle` that is one."""
        for char in bundle:
            if char in self.shorts:
                return self.shorts[char]
        return None


def _word(arg: str, denied: _Denied) -> str | None:
    """The denied single-dash word that `arg` spells as `-word`, `-word=…` or `--word[=…]`."""
    if not arg.startswith("-"):
        return None
    body = arg[2:] if arg.startswith("--") else arg[1:]
    return denied.words.get(body.split("=", 1)[0])


def _option(arg: str, denied: _Denied) -> str | None:
    """The denied long or short option that `arg`, read as an option, spells."""
    if arg.startswith("--"):
        return denied.long_prefixed_by(arg[2:].split("=", 1)[0])
    body = arg[1:]
    hit = denied.short_in(body)
    if hit is not None:
        return hit
    name = body.split("=", 1)[0]
    # One character is a short option first; an empty name ("-=x") can still pick the only
    # long option of a getopt_long_only program.
    if len(name) >= 2 or not name:
        return denied.long_prefixed_by(name)
    return None


def denied_option(
    args: Sequence[str], denied: Sequence[str], *, old_style_first: bool = False
) -> OptionHit | None:
    """The first argument of `args` (argv[1:]) that spells a `denied` option, or None."""
    table = _Denied.of(denied)
    options_ended = False
    for index, arg in enumerate(args):
        hit = _word(arg, table)
        if hit is None and not options_ended:
            if arg == "--":
                options_ended = True
            elif index == 0 and old_style_first and not arg.startswith("-"):
                hit = table.short_in(arg)
            elif arg.startswith("-") and arg != "-":
                hit = _option(arg, table)
        if hit is not None:
            return OptionHit(option=hit, argument=arg, index=index)
    return None


def describe(hit: OptionHit, executable: str) -> str:
    """One line saying which argument of `executable` spells which denied option."""
    shown = hit.argument
    if len(shown) > _SHOWN_CHARS:
        shown = shown[:_SHOWN_CHARS] + "…"
    return (
        f"argv[{hit.index + 1}] {shown!r} of {executable} spells the option {hit.option}, "
        "refused by deny_options"
    )
