"""Known programs and environment variables that run other code, from their manual pages.

A tenant that accepts raw argvs must keep callers away from the options that make a program run
a command, a script or a library (`tar --to-command`, `rsync -e`, `find -exec`). This table
names them, so that loading a tenants file can warn about the ones its `deny_options` leaves
open, and names the variables a spec's `env` may never set. It lists what the manual pages say
runs code, not every risky option: deleting and overwriting are the allow-list's concern.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DangerousProgram:
    """A program that can run other code, and the option spellings that make it do so."""

    names: tuple[str, ...]  # basenames without version suffixes; the first names the family
    options: tuple[str, ...]  # spellings to list in deny_options, long and short
    why: str
    old_style_first: bool = False  # a first argument without "-" is a bundle of short options
    runs_operands: bool = False  # runs its operands as a command: no deny_options helps
    runs_code: bool = False  # an interpreter: runs any program text or file it is given

    @property
    def name(self) -> str:
        """The family name, as messages show it."""
        return self.names[0]


def _operands(*names: str, why: str, options: tuple[str, ...] = ()) -> DangerousProgram:
    return DangerousProgram(names, options, why, runs_operands=True)


def _code(*names: str, why: str, options: tuple[str, ...] = ()) -> DangerousProgram:
    return DangerousProgram(names, options, why, runs_code=True)


_SHELL = "a shell: -c COMMAND, or a script file"

PROGRAMS: tuple[DangerousProgram, ...] = (
    DangerousProgram(
        ("tar",),
        ("--checkpoint-action", "--to-command", "--use-compress-program", "-I",
         "--rsh-command", "--rmt-command", "--info-script", "--new-volume-script", "-F"),
        "checkpoint-action=exec, to-command, use-compress-program, rsh/rmt-command and "
        "info-script run a given command",
        old_style_first=True,
    ),
    DangerousProgram(
        ("rsync",),
        ("-e", "--rsh", "--rsync-path", "-M", "--remote-option"),
        "--rsh runs the given remote shell; --rsync-path and --remote-option pick what it runs",
    ),
    DangerousProgram(
        ("find",),
        ("-exec", "-execdir", "-ok", "-okdir", "-delete",
         "-fprint", "-fprint0", "-fprintf", "-fls"),
        "-exec, -execdir, -ok and -okdir run commands; -delete and -fprint* change files",
    ),
    DangerousProgram(
        ("git",),
        ("-c", "--config", "--config-env", "--exec-path", "--upload-pack", "-u",
         "--receive-pack", "--exec", "--template", "--git-dir"),
        "config (core.sshCommand, core.fsmonitor, aliases), exec-path, upload-pack and templated "
        "hooks run commands; bisect run and submodule foreach run their operands",
        runs_operands=True,
    ),
    DangerousProgram(
        ("ssh",),
        ("-o", "-F"),
        "-o ProxyCommand/LocalCommand/KnownHostsCommand and a -F config file run commands",
    ),
    DangerousProgram(
        ("scp",), ("-o", "-F", "-S"), "-S names the program run for the connection; -o as ssh"
    ),
    DangerousProgram(
        ("sftp",), ("-o", "-F", "-S", "-D"), "-S and -D name a program to run; -o as ssh"
    ),
    DangerousProgram(
        ("zip",),
        ("-T", "--test", "-TT", "--unzip-command"),
        "-T tests the archive with the command of -TT/--unzip-command",
    ),
    DangerousProgram(
        ("man",),
        ("-P", "--pager", "-H", "--html", "-C", "--config-file"),
        "--pager and --html run the given command; a --config-file defines the programs it runs",
    ),
    DangerousProgram(("tcpdump",), ("-z",), "-z runs the given command on each rotated file"),
    _operands("env", why="env [OPTION]... [NAME=VALUE]... [COMMAND [ARG]...]"),
    _operands("xargs", why="xargs [OPTION]... [COMMAND [INITIAL-ARGS]...]"),
    _operands("nice", why="nice [OPTION] [COMMAND [ARG]...]"),
    _operands("nohup", why="nohup COMMAND [ARG]..."),
    _operands("timeout", why="timeout [OPTION] DURATION COMMAND [ARG]..."),
    _operands("setsid", why="setsid [options] program [arguments]"),
    _operands("stdbuf", why="stdbuf OPTION... COMMAND"),
    _operands("chroot", why="chroot [OPTION] NEWROOT [COMMAND [ARG]...]"),
    _operands("ionice", why="ionice [options] command [argument...]"),
    _operands("taskset", why="taskset [options] mask command [argument...]"),
    _operands("flock", why="flock [options] file command [arguments], or -c command"),
    _operands("unshare", why="unshare [options] [program [arguments]]"),
    _operands("nsenter", why="nsenter [options] [program [arguments]]"),
    _operands("strace", "ltrace", why="strace [options] command [args]"),
    _operands("watch", why="watch [options] command, run by sh -c"),
    _operands("sudo", "doas", "runuser", "su", why="sudo [options] command, as another user"),
    _operands("busybox", "toybox", "coreutils",
              why="one binary for many programs: allowing any of its names allows them all, "
              "env and sh among them"),
    _code("python", "python3", "python2", "pypy", "pypy3", why="python -c CMD, -m MODULE, FILE",
          options=("-c", "-m")),
    _code("perl", why="perl -e CODE, -M MODULE, FILE", options=("-e", "-E", "-M", "-m")),
    _code("ruby", why="ruby -e CODE, -r LIBRARY, FILE", options=("-e", "-r")),
    _code("node", "nodejs", why="node -e CODE, -r MODULE, FILE",
          options=("-e", "--eval", "-p", "--print", "-r", "--require", "--import")),
    _code("php", why="php -r CODE, FILE", options=("-r",)),
    _code("lua", "luajit", why="lua -e CODE, -l MODULE, FILE", options=("-e", "-l")),
    _code("sh", "dash", "ash", "ksh", "mksh", "zsh", why=_SHELL, options=("-c",)),
    _code("bash", why=_SHELL, options=("-c", "--rcfile", "--init-file")),
    _code("awk", "gawk", "mawk", "nawk",
          why="awk programs run commands with system() and | getline",
          options=("-f", "--file", "-e", "--source", "-E", "--exec", "-l", "--load")),
    _code("sed", why="GNU sed's e command and the s///e and w flags run commands or write files",
          options=("-e", "--expression", "-f", "--file")),
    _code("vim", "vi", "nvim", "ex", "view", "vimdiff",
          why="-c, --cmd, -S and -u run Ex commands, :! shell commands among them",
          options=("-c", "--cmd", "-S", "-u")),
    _code("make", "gmake", why="runs the recipes of any makefile it reads (-f, --eval, ./Makefile)",
          options=("-f", "--file", "--makefile", "-E", "--eval")),
)  # fmt: skip

_BY_NAME: dict[str, DangerousProgram] = {
    name: program for program in PROGRAMS for name in program.names
}
_VERSION_SUFFIX = re.compile(r"[-_.]?\d+$")

_LOADER = "changes which libraries or data files the dynamic loader or libc loads"
_RESOLVER = "changes how libc resolves host names"
_SHELL_START = "a shell reads or runs it"
_INTERPRETER = "makes an interpreter load or run other code"
_TOOL_OPTIONS = "adds options to a tool behind the argv checks"
_HELPER = "names a program that a tool runs"
_GIT = "makes git read another configuration or run another program"

DANGEROUS_ENV_REASONS: dict[str, str] = {
    **dict.fromkeys(("GLIBC_TUNABLES", "LOCPATH", "NLSPATH"), _LOADER),
    **dict.fromkeys(("HOSTALIASES", "RES_OPTIONS"), _RESOLVER),
    **dict.fromkeys(
        ("BASH_ENV", "ENV", "IFS", "SHELLOPTS", "BASHOPTS", "PS4", "PROMPT_COMMAND", "CDPATH",
         "ZDOTDIR"),
        _SHELL_START,
    ),
    **dict.fromkeys(
        ("PYTHONSTARTUP", "PYTHONPATH", "PYTHONHOME", "PYTHONINSPECT", "PYTHONUSERBASE",
         "PYTHONWARNINGS", "PYTHONBREAKPOINT", "PYTHONPLATLIBDIR",
         "PERL5OPT", "PERL5LIB", "PERLLIB", "PERL5DB", "RUBYOPT", "RUBYLIB",
         "NODE_OPTIONS", "NODE_PATH", "PHPRC", "PHP_INI_SCAN_DIR", "TCLLIBPATH",
         "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "CLASSPATH",
         "OPENSSL_CONF", "OPENSSL_ENGINES", "OPENSSL_MODULES"),
        _INTERPRETER,
    ),
    **dict.fromkeys(
        ("TAR_OPTIONS", "GZIP", "BZIP", "BZIP2", "XZ_OPT", "XZ_DEFAULTS", "MANOPT",
         "MAKEFLAGS", "MFLAGS", "GNUMAKEFLAGS", "MAKEFILES", "LESS"),
        _TOOL_OPTIONS,
    ),
    **dict.fromkeys(
        ("RSYNC_RSH", "RSYNC_CONNECT_PROG", "SSH_ASKPASS", "SSH_ASKPASS_REQUIRE", "SUDO_ASKPASS",
         "LESSOPEN", "LESSCLOSE", "PAGER", "MANPAGER", "EDITOR", "VISUAL", "BROWSER", "SHELL"),
        _HELPER,
    ),
    **dict.fromkeys(
        ("GIT_SSH", "GIT_SSH_COMMAND", "GIT_EXEC_PATH", "GIT_ASKPASS", "GIT_EDITOR",
         "GIT_SEQUENCE_EDITOR", "GIT_PAGER", "GIT_EXTERNAL_DIFF", "GIT_PROXY_COMMAND",
         "GIT_TEMPLATE_DIR", "GIT_DIR", "GIT_ALLOW_PROTOCOL"),
        _GIT,
    ),
}  # fmt: skip
DANGEROUS_ENV = frozenset(DANGEROUS_ENV_REASONS)
DANGEROUS_ENV_PREFIX_REASONS: dict[str, str] = {
    "LD_": _LOADER,
    "DYLD_": _LOADER,
    "GCONV_": _LOADER,
    "MALLOC_": _LOADER,
    "BASH_FUNC_": "defines a shell function that replaces a command",
    "GIT_CONFIG": _GIT,  # GIT_CONFIG_GLOBAL, _COUNT, _KEY_n, _VALUE_n, _PARAMETERS
    "LUA_": _INTERPRETER,  # LUA_INIT runs code; LUA_PATH and LUA_CPATH pick modules
}
DANGEROUS_ENV_PREFIXES = tuple(DANGEROUS_ENV_PREFIX_REASONS)


def dangerous_env(name: str) -> str | None:
    """Why setting variable `name` could run other code, or None when it is not known to."""
    if name in DANGEROUS_ENV_REASONS:
        return DANGEROUS_ENV_REASONS[name]
    for prefix, reason in DANGEROUS_ENV_PREFIX_REASONS.items():
        if name.startswith(prefix):
            return reason
    return None


def _by_basename(basename: str) -> DangerousProgram | None:
    """The entry for `basename`, also with version suffixes (python3.11, perl5.36, vim.basic)."""
    for candidate in (basename, basename.split(".", 1)[0]):
        name = candidate
        while name:
            if name in _BY_NAME:
                return _BY_NAME[name]
            shorter = _VERSION_SUFFIX.sub("", name)
            if shorter == name:
                break
            name = shorter
    return None


def lookup(executable_path: str) -> DangerousProgram | None:
    """The entry for the program `executable_path` runs: by the real file, then by the name."""
    real = os.path.basename(os.path.realpath(executable_path))
    return _by_basename(real) or _by_basename(os.path.basename(executable_path))


def raw_argv_warnings(
    name: str,
    executables: Sequence[str],
    deny_options: Mapping[str, Sequence[str]],
    raw_argv: bool,
) -> list[str]:
    """One sentence per allow-listed program a raw argv could use to run other code."""
    if not raw_argv:
        return []
    warnings: list[str] = []
    for executable in executables:
        program = lookup(executable)
        if program is None:
            continue
        real = os.path.realpath(executable)
        why = f"({program.why})"
        if program.runs_code or program.runs_operands:
            runs = "any code it is given" if program.runs_code else "its operands as a command"
            warnings.append(
                f"tenant {name!r}: {executable} runs {runs} {why}, which deny_options cannot "
                "prevent: allow it only through actions (raw_argv: false)"
            )
            continue
        denied = {
            option
            for key, options in deny_options.items()
            if os.path.realpath(key) == real
            for option in options
        }
        missing = [option for option in program.options if option not in denied]
        if missing:
            warnings.append(
                f"tenant {name!r}: {executable} can run other code through options its "
                f"deny_options leaves open: {', '.join(missing)} {why}"
            )
    return warnings
