"""The `credit` command: `credit env`, `credit train`, `credit eval`, `credit viz`.

A user error (a bad flag value, a missing data file, a directory that is not a model) prints one line,
`credit <command>: error: <what is wrong and what to do>`, to stderr and exits with status 2. `--debug` (or
CREDIT_DEBUG=1) shows the traceback instead. Errors that are not the user's (bugs) always keep their traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

# name -> (help, add_arguments(parser), run(args) -> exit code)
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}

# Exceptions that carry a message for the user (the project's convention: a ValueError names the argument, the
# expectation and what arrived). Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)


class UsageError(Exception):
    """A user error raised by a command itself (e.g. `credit eval --run DIR` without a checkpoint)."""


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register a subcommand; `run(args)` returns the exit code."""

    def register(run):
        _COMMANDS[name] = (help, add_arguments, run)
        return run

    return register


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `credit train: error: ... (see credit train --help)`, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@command("env", "print versions, the device and which backends are live")
def _env(args: argparse.Namespace) -> int:
    from credit.env import main

    main()
    return 0


def _load_subcommands() -> None:
    # Subcommands that live in other modules register on import; a missing optional dependency must not
    # break `credit env`.
    import importlib

    for module in ("credit.train_cli",):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def _debug_requested(args: argparse.Namespace | None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("CREDIT_DEBUG", "") not in ("", "0")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text


def main(argv: list[str] | None = None) -> int:
    _load_subcommands()
    parser = _Parser(prog="credit", description="CREDIT: fused kernels and a compact trainer")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors (or CREDIT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parsers = {}
    for name, (help_text, add_arguments, _) in _COMMANDS.items():
        p = parsers[name] = sub.add_parser(name, help=help_text, description=help_text)
        # SUPPRESS: a subcommand's unset --debug must not overwrite `credit --debug <command>`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of a user error (or set CREDIT_DEBUG=1)")
        add_arguments(p)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the subcommand's parser, so the message names `credit <command>`
        parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return _COMMANDS[args.command][2](args)
    except (UsageError, *USER_ERRORS) as e:
        if _debug_requested(args):
            raise
        print(f"credit {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
