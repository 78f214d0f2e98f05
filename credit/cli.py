"""The `credit` command: `credit env` (more subcommands register here)."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

# name -> (help, add_arguments(parser), run(args) -> exit code)
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register a subcommand; `run(args)` returns the exit code."""

    def register(run):
        _COMMANDS[name] = (help, add_arguments, run)
        return run

    return register


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


def main(argv: list[str] | None = None) -> int:
    _load_subcommands()
    parser = argparse.ArgumentParser(prog="credit", description="CREDIT: fused kernels and a compact trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in _COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return _COMMANDS[args.command][2](args)


if __name__ == "__main__":
    sys.exit(main())
