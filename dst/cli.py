"""The ``dst`` command line: ``train``, ``study``, ``worker``, ``report`` and ``replay``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from dst._errors import DivergedError, UsageError


class _ArgumentParser(argparse.ArgumentParser):
    """Argument parser whose errors are one line on stderr with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    from dst import _study_cli, _train_cli

    parser = _ArgumentParser(
        prog="dst",
        description="Dropped Scheduled Task ablations: train, search with Optuna, track in MLflow",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="level of the log lines written to stderr (default: INFO)",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)
    _train_cli.add_parser(commands)
    _study_cli.add_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.handler(args) or 0)
    except UsageError as error:
        print(f"dst {args.command}: error: {error}", file=sys.stderr)
        return 2
    except DivergedError as error:
        print(f"dst {args.command}: error: training diverged: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dst {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
