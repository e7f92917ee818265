"""Subcommands of `sessa-scale`: each module offers `register(subparsers)` and `run(args) -> int`."""
