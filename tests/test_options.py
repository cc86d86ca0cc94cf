"""The option matcher: a denied option is refused in every spelling the program could accept."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from producer.options import OptionHit, denied_option, describe

RM = ["--recursive", "-r", "-R"]
TAR = ["--checkpoint-action", "--to-command", "--use-compress-program", "-I"]
RSYNC = ["-e", "--rsh", "--rsync-path"]
FIND = ["-exec", "-execdir", "-ok", "-okdir", "-delete"]


def hit(args: list[str], denied: list[str], **kwargs: bool) -> tuple[str, str, int] | None:
    found = denied_option(args, denied, **kwargs)
    return None if found is None else (found.option, found.argument, found.index)


# --- long options -----------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["--recursive", "--recursiv", "--rec", "--r"])
def test_a_long_option_and_every_prefix_of_it_is_refused(spelling: str) -> None:
    assert hit([spelling, "DIR"], RM) == ("--recursive", spelling, 0)


def test_a_long_option_prefix_is_refused_among_other_options() -> None:
    assert hit(["--rec", "--force", "DIR"], RM) == ("--recursive", "--rec", 0)


@pytest.mark.parametrize("spelling", ["--recursive=yes", "--rec=yes", "--recursive="])
def test_a_long_option_with_a_value_is_refused(spelling: str) -> None:
    assert hit([spelling], RM) == ("--recursive", spelling, 0)


def test_a_longer_name_than_the_denied_one_is_another_option() -> None:
    assert hit(["--recursively", "--force", "--verbose"], RM) is None


def test_an_empty_long_name_with_a_value_is_refused() -> None:
    # getopt_long takes `--=x` as the program's only long option when it has just one.
    assert hit(["--=x"], ["--recursive"]) == ("--recursive", "--=x", 0)


def test_a_prefix_that_is_also_another_option_is_still_refused() -> None:
    # --checkpoint is a tar option of its own; refusing it too is the safe mistake.
    args = ["--checkpoint=1", "--checkpoint-action=exec=id", "-cf", "a.tar", "."]
    assert hit(args, TAR) == ("--checkpoint-action", "--checkpoint=1", 0)
    assert hit(args[1:], TAR) == ("--checkpoint-action", "--checkpoint-action=exec=id", 0)


# --- short options and bundles ----------------------------------------------------------------


def test_separate_short_options_are_refused() -> None:
    assert hit(["-r", "-f", "DIR"], RM) == ("-r", "-r", 0)
    assert hit(["-f", "-r", "DIR"], RM) == ("-r", "-r", 1)


@pytest.mark.parametrize("bundle", ["-Rf", "-fR", "-rfv", "-vrf", "-rf"])
def test_a_bundle_of_short_options_is_refused(bundle: str) -> None:
    found = denied_option([bundle, "DIR"], RM)
    assert found is not None
    assert found.argument == bundle
    assert found.option in {"-r", "-R"}


def test_a_short_option_with_an_attached_value_is_refused() -> None:
    assert hit(["-e'sh -c id'", "src", "dst"], RSYNC) == ("-e", "-e'sh -c id'", 0)
    assert hit(["-vesh", "src", "dst"], RSYNC) == ("-e", "-vesh", 0)


def test_a_short_option_given_its_value_separately_is_refused() -> None:
    assert hit(["-e", "sh -c id", "src", "dst"], RSYNC) == ("-e", "-e", 0)


def test_short_options_are_case_sensitive() -> None:
    assert hit(["-R"], ["-r"]) is None
    assert hit(["-vf"], RM) is None


def test_a_single_dash_long_option_prefix_is_refused() -> None:
    # getopt_long_only programs take `-recur` for --recursive.
    assert hit(["-recur"], ["--recursive"]) == ("--recursive", "-recur", 0)
    assert hit(["-recursive=yes"], ["--recursive"]) == ("--recursive", "-recursive=yes", 0)


def test_one_character_after_a_dash_is_a_short_option_only() -> None:
    assert hit(["-v"], ["--verbose"]) is None


# --- operands and the end of options ----------------------------------------------------------


def test_an_option_after_operands_is_refused() -> None:
    assert hit(["DIR", "-r"], RM) == ("-r", "-r", 1)
    assert hit(["a", "b", "--recursive"], RM) == ("--recursive", "--recursive", 2)


@pytest.mark.parametrize("after", ["-r", "--recursive", "-rf", "--rec=yes"])
def test_an_option_after_a_double_dash_is_an_operand(after: str) -> None:
    assert hit(["-f", "--", after], RM) is None


def test_a_second_double_dash_is_an_operand() -> None:
    assert hit(["--", "--", "-r"], RM) is None


def test_a_lone_dash_is_an_operand() -> None:
    assert hit(["-", "DIR"], RM) is None


def test_an_operand_is_never_an_option() -> None:
    assert hit(["recursive", "r", "R", "rf", "exec"], RM + FIND) is None


def test_the_first_hit_in_argv_order_is_returned() -> None:
    assert hit(["-v", "--rec", "-r"], RM) == ("--recursive", "--rec", 1)


def test_an_empty_deny_list_refuses_nothing() -> None:
    assert hit(["-rf", "--recursive", "-exec"], []) is None


# --- single-dash words ------------------------------------------------------------------------


def test_a_single_dash_word_is_refused() -> None:
    assert hit(["/", "-name", "x", "-exec", "id", ";"], FIND) == ("-exec", "-exec", 3)


def test_a_single_dash_word_is_refused_after_a_double_dash() -> None:
    assert hit(["--", "/", "-exec", "id", ";"], FIND) == ("-exec", "-exec", 2)


def test_a_single_dash_word_with_a_value_is_refused() -> None:
    assert hit(["-engine=evil"], ["-engine"]) == ("-engine", "-engine=evil", 0)


def test_a_single_dash_word_spelled_with_two_dashes_is_refused() -> None:
    # OpenSSL takes -engine and --engine alike.
    assert hit(["req", "--engine", "evil"], ["-engine"]) == ("-engine", "--engine", 1)


def test_a_single_dash_word_matches_only_in_full() -> None:
    assert hit(["/", "-executable", "-exe", "-okay"], FIND) is None
    assert hit(["/", "-execdir", "id", ";"], ["-exec"]) is None


# --- old-style first argument (tar, ps, ar) ---------------------------------------------------


def test_an_old_style_first_argument_is_a_bundle_of_short_options() -> None:
    args = ["cIf", "gzip -d; id", "out.tgz", "."]
    assert hit(args, TAR, old_style_first=True) == ("-I", "cIf", 0)


def test_an_old_style_first_argument_is_an_operand_for_other_programs() -> None:
    assert hit(["cIf", "x.tgz"], TAR) is None


def test_an_old_style_first_argument_without_denied_letters_is_allowed() -> None:
    assert hit(["xf", "a.tar"], TAR, old_style_first=True) is None


def test_only_the_first_argument_is_old_style() -> None:
    assert hit(["-x", "cIf"], TAR, old_style_first=True) is None
    assert hit(["-xIf", "a.tgz"], TAR, old_style_first=True) == ("-I", "-xIf", 0)


# --- describe ---------------------------------------------------------------------------------


def test_a_hit_is_described_in_one_line_by_its_argv_position() -> None:
    found = denied_option(["-f", "-vrf", "DIR"], RM)
    assert found is not None
    assert describe(found, "/bin/rm") == (
        "argv[2] '-vrf' of /bin/rm spells the option -r, refused by deny_options"
    )


def test_a_long_or_multiline_argument_is_shown_on_one_short_line() -> None:
    found = OptionHit(option="--to-command", argument="--to=" + "x\n" * 100, index=0)
    text = describe(found, "/bin/tar")
    assert "\n" not in text
    assert len(text) < 200
    assert text.startswith("argv[1] '--to=x\\nx")


# --- properties -------------------------------------------------------------------------------

LETTERS = string.ascii_letters + string.digits
# Few letters, so that random arguments often collide with the denied entries.
FEW = "abrRfv"
long_names = st.text(FEW.lower() + "-", min_size=1, max_size=8).filter(
    lambda name: not name.startswith("-")
)
denied_sets = st.tuples(
    st.lists(long_names.map("--{}".format), max_size=3),
    st.lists(st.sampled_from(FEW + "9?").map("-{}".format), max_size=3),
    st.lists(st.sampled_from(["-exec", "-execdir", "-ok", "-delete"]), max_size=2),
).map(lambda kinds: [entry for kind in kinds for entry in kind])
some_args = st.lists(
    st.one_of(
        st.text(max_size=6),
        st.sampled_from(["--", "-", "-x", "--x", "-=", "--=", "=", "-rf"]),
        st.text("-=" + FEW, max_size=5),
    ),
    max_size=6,
)
values = st.text(max_size=4)


@st.composite
def spelling_of(draw: st.DrawFn, entry: str) -> str:
    """One spelling a program would take for the denied `entry`."""
    if entry.startswith("--"):
        name = entry[2:]
        prefix = name[: draw(st.integers(1, len(name)))]
        value = draw(st.none() | values)
        return f"--{prefix}" if value is None else f"--{prefix}={value}"
    if len(entry) == 2:
        before = draw(st.text(LETTERS, max_size=3))
        after = draw(st.text(max_size=3))
        return f"-{before}{entry[1]}{after}"
    value = draw(st.none() | values)
    return entry if value is None else f"{entry}={value}"


def obviously_denied(arg: str, denied: list[str]) -> bool:
    """The plainest reading of the rules, to check the matcher against."""
    is_long = arg.startswith("--") and len(arg) > 2
    is_bundle = arg.startswith("-") and not arg.startswith("--")
    for entry in denied:
        if arg == entry:
            return True
        name = arg[2:].partition("=")[0]
        if is_long and entry.startswith("--") and entry[2:].startswith(name):
            return True
        if is_bundle and len(entry) == 2 and entry[1] in arg[1:]:
            return True
    return False


def before_double_dash(args: list[str]) -> list[str]:
    return args[: args.index("--")] if "--" in args else args


PROPERTY = settings(max_examples=400, deadline=None)


@PROPERTY
@given(args=some_args, denied=denied_sets)
def test_an_argument_that_plainly_spells_a_denied_option_is_always_found(
    args: list[str], denied: list[str]
) -> None:
    if any(obviously_denied(arg, denied) for arg in before_double_dash(args)):
        assert denied_option(args, denied) is not None


@PROPERTY
@given(data=st.data(), args=some_args, denied=denied_sets.filter(bool))
def test_a_denied_spelling_inserted_before_the_double_dash_is_always_found(
    data: st.DataObject, args: list[str], denied: list[str]
) -> None:
    spelling = data.draw(st.sampled_from(denied).flatmap(spelling_of))
    position = data.draw(st.integers(0, len(before_double_dash(args))))
    changed = [*args[:position], spelling, *args[position:]]
    found = denied_option(changed, denied)
    assert found is not None
    assert found.index <= position


@PROPERTY
@given(args=some_args, denied=denied_sets, old_style_first=st.booleans())
def test_a_hit_names_its_argument_and_a_denied_entry_and_is_the_first(
    args: list[str], denied: list[str], old_style_first: bool
) -> None:
    found = denied_option(args, denied, old_style_first=old_style_first)
    if found is not None:
        assert found.argument == args[found.index]
        assert found.option in denied
        assert denied_option(args[: found.index], denied, old_style_first=old_style_first) is None


@PROPERTY
@given(
    args=st.lists(st.text(min_size=0, max_size=8).filter(lambda a: not a.startswith("-"))),
    denied=denied_sets,
)
def test_operands_without_a_leading_dash_are_never_refused(
    args: list[str], denied: list[str]
) -> None:
    assert denied_option(args, denied) is None


@PROPERTY
@given(args=some_args, denied=denied_sets)
def test_old_style_parsing_only_adds_refusals(args: list[str], denied: list[str]) -> None:
    if denied_option(args, denied) is not None:
        assert denied_option(args, denied, old_style_first=True) is not None
