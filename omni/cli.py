"""The `omni` command. Each subcommand lives beside the code it drives and registers itself here.

Modules listed in COMMANDS expose `register(subparsers)`, which adds their parsers and sets
`func` (taking the parsed args, returning an exit code). They import heavy libraries only
inside `func`, so `omni --help` stays fast.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys

COMMANDS = [
    "omni.data.cli",  # omni data shapes|digits|tokenizer
    "omni.train.cli",  # omni train, omni export
    "omni.inference.cli",  # omni generate, omni chat
    "omni.eval.cli",  # omni eval
    "omni.serve.cli",  # omni serve
    "omni.demo",  # omni demo
    "omni.models.convert",  # omni convert chameleon
]


def build_parser() -> argparse.ArgumentParser:
    from omni import __version__

    parser = argparse.ArgumentParser(
        prog="omni",
        description="Train, sample and evaluate models that read and write interleaved text and images.",
    )
    parser.add_argument("--version", action="version", version=f"omni {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of its one-line summary")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue  # a command not built yet
        module.register(sub)
    return parser


def command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command `args` were parsed for: `omni data shapes ...` -> its own."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs else None
        if name not in (subs[0].choices if subs else {}):
            return parser
        parser = subs[0].choices[name]


def unrecognized(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> None:
    """Stop on arguments no parser took, with the command's own usage and the closest flag it has
    (`omni generate --promt x` -> did you mean --prompt?)."""
    command = command_parser(parser, args)
    flags = [f for action in command._actions for f in action.option_strings]
    hints = []
    for arg in extra:
        if arg.startswith("-"):
            name = arg.split("=", 1)[0]
            close = difflib.get_close_matches(name, flags, n=1, cutoff=0.75)
            if close:
                hints.append((name, close[0]))
    hint = ""
    if len(hints) == 1:
        hint = f" (did you mean {hints[0][1]}?)"
    elif hints:
        hint = " (did you mean " + ", ".join(f"{good} for {bad}" for bad, good in hints) + "?)"
    command.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Dotted overrides may come anywhere (`omni train --config C a=1 --resume auto b=2`): argparse
    # gives a positional list only its first run, and cannot intermix with subcommands, so later
    # runs come back as extras and join `overrides`. An unknown --flag is still an error.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not isinstance(getattr(args, "overrides", None), list) or any(a.startswith("-") for a in extra):
            unrecognized(parser, args, extra)
        args.overrides = [*args.overrides, *extra]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # User errors (bad config key, missing checkpoint, wrong image size, a full disk): one clear
        # line; bugs keep their traceback, and --debug shows it for every error.
        from omni.errors import describe

        line = None if args.debug else describe(e)
        if line is None:
            raise
        print(f"omni: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
