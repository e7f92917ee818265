"""`sessa-scale` / `python -m sessa_scale`: parse the command line and dispatch to a command
module under sessa_scale/commands/. User errors, and file-system faults (no space, read-only,
permission) wherever they occur, print one paragraph and exit with status 2."""

from __future__ import annotations

import argparse
import importlib
import sys

from sessa_scale.errors import UserError
from sessa_scale.filesystem import cause_of, is_file_system_fault

COMMANDS = ("train", "generate", "params", "config", "bench", "eval", "probe", "report", "prep", "synth", "export")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sessa-scale", description="Pretrain, sample and measure Sessa language models."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {name: importlib.import_module(f"sessa_scale.commands.{name}") for name in COMMANDS}
    for module in modules.values():
        module.register(subparsers)
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args) or 0)
    except UserError as exc:
        print(f"sessa-scale {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if not is_file_system_fault(exc):
            raise
        where = f"{exc.filename}: " if exc.filename is not None else ""
        print(f"sessa-scale {args.command}: error: {where}{cause_of(exc)}.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sessa-scale {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
