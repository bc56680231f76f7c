"""The ``dst study create``, ``dst study run``, ``dst worker``, ``dst replay`` and ``dst report``
commands.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from dst._errors import UsageError

_logger = logging.getLogger(__name__)

REPORT_FORMATS = ("text", "markdown", "csv", "html")
_SUFFIX_FORMATS = {".md": "markdown", ".csv": "csv", ".html": "html", ".htm": "html"}


def add_parsers(commands: Any) -> None:
    """Add the ``study``, ``worker`` and ``report`` subcommands to ``commands``."""
    study = commands.add_parser(
        "study",
        help="create or run an Optuna study from a study file",
        description="Create an Optuna study from a study file, or create it and run a worker.",
    )
    study_commands = study.add_subparsers(
        dest="study_command", required=True, parser_class=type(study)
    )
    create = study_commands.add_parser(
        "create",
        help="create the study, enqueue its rows and create its MLflow parent run",
        description="Create the study, enqueue each row once and create its MLflow parent run."
        " Running it again, or from several machines at once, changes nothing.",
    )
    _add_study_file_arguments(create)
    create.set_defaults(handler=run_create)

    run = study_commands.add_parser(
        "run",
        help="create the study and run one worker in this process",
        description="Create the study and run its trials in this process (the laptop path).",
    )
    _add_study_file_arguments(run)
    _add_training_arguments(run)
    run.set_defaults(handler=run_study)

    worker = commands.add_parser(
        "worker",
        help="run trials of a study until it has n_trials",
        description="Pull trials of a study and train them until the study has n_trials."
        " Any number of workers may run at once, on any number of machines.",
    )
    worker.add_argument("--study", required=True, help="name of the study to work on")
    _add_service_arguments(worker, stored_uri=True)
    worker.add_argument(
        "--data-dir",
        help="this machine's data folder, for experiments that read one (default: the"
        " folder stored by study create)",
    )
    _add_training_arguments(worker)
    _add_heartbeat_arguments(worker)
    worker.set_defaults(handler=run_worker_command)

    replay = commands.add_parser(
        "replay",
        help="send the epochs a worker kept on disk while MLflow did not respond",
        description="Send the per-epoch metrics that a worker kept in a spool file while the"
        " MLflow tracking server did not respond, in order, then delete the file.",
    )
    replay.add_argument("file", type=Path, help="spool file, such as dst-mlflow-spool/RUN.jsonl")
    replay.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: the URI stored in the file)"
    )
    replay.set_defaults(handler=run_replay)

    report = commands.add_parser(
        "report",
        help="print the Table 9 report of a study",
        description="Build the Table 9 report of a study from its finished MLflow runs.",
    )
    report.add_argument("--study", required=True, help="name of the study")
    report.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    report.add_argument(
        "--format",
        choices=REPORT_FORMATS,
        help="output format (default: from the --output suffix .txt, .md, .csv or .html,"
        " else a text table)",
    )
    report.add_argument("--output", type=Path, help="file to write instead of stdout")
    report.set_defaults(handler=run_report)


def _add_service_arguments(parser: argparse.ArgumentParser, *, stored_uri: bool) -> None:
    parser.add_argument(
        "--storage",
        help="Optuna storage URL (default: $DST_STORAGE, else sqlite:///dst-studies.db)",
    )
    if stored_uri:
        help_text = (
            "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the URI stored with"
            " the study, else sqlite:///mlflow.db)"
        )
    else:
        help_text = (
            "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db);"
            " a URI given here or in the environment is stored with the study for its workers"
        )
    parser.add_argument("--tracking-uri", help=help_text)


def _add_study_file_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file", type=Path, help="study file (TOML), such as studies/quickstart.toml"
    )
    _add_service_arguments(parser, stored_uri=False)
    parser.add_argument(
        "--n-epochs", type=int, help="epochs per run (default: the study file's n_epochs)"
    )
    parser.add_argument(
        "--seeds",
        help="number of seeds (the file's first ones), or a comma-separated list such as 0,4,7"
        " (default: the study file's seeds)",
    )
    parser.add_argument(
        "--n-trials",
        type=int,
        help="trials of the whole study (default: the study file's n_trials)",
    )
    parser.add_argument(
        "--data-dir",
        help="data folder of the experiment, for experiments that read one (default: none)",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="experiment option replacing the file's (repeatable), such as image_size=16",
    )


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        help="torch device; auto picks CUDA when available (default: auto)",
    )
    parser.add_argument(
        "--num-workers", type=int, default=0, help="DataLoader worker processes (default: 0)"
    )
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        help="folder for per-epoch checkpoints, one subfolder per study, trial and seed"
        " (default: none)",
    )


def _add_heartbeat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--heartbeat-interval",
        type=int,
        default=30,
        help="seconds between heartbeats of the running trial (default: 30)",
    )
    parser.add_argument(
        "--grace-period",
        type=int,
        default=120,
        help="seconds without a heartbeat after which another worker fails the trial and"
        " queues it again (default: 120)",
    )
    parser.add_argument(
        "--spool-dir",
        type=Path,
        default=Path("dst-mlflow-spool"),
        help="folder of the epochs kept while the MLflow server does not respond"
        " (default: dst-mlflow-spool)",
    )
    parser.add_argument(
        "--outage-limit",
        type=int,
        default=600,
        help="seconds of training while the MLflow server does not respond, after which the"
        " worker stops (default: 600)",
    )
    parser.add_argument(
        "--max-retry",
        type=int,
        default=3,
        help="times a trial whose worker died is queued again (default: 3)",
    )


def run_create(args: argparse.Namespace) -> int:
    """Handle ``dst study create``."""
    from dst._study import create_study
    from dst._study_storage import resolve_storage_url, resolve_tracking_uri

    config = _load_config(args)
    storage_url = resolve_storage_url(args.storage)
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    created = create_study(
        config, storage_url, tracking_uri, store_tracking_uri=_tracking_uri_given(args)
    )
    print(
        f"study {config.name}: {created.n_enqueued} rows enqueued, {created.n_existing} already"
        f" there, n_trials {config.n_trials}; start workers with"
        f" 'dst worker --study {config.name}'"
    )
    return 0


def run_study(args: argparse.Namespace) -> int:
    """Handle ``dst study run``: create the study, run one worker, print the report."""
    from dst._study import WorkerSettings, create_study, run_worker
    from dst._study_storage import resolve_storage_url, resolve_tracking_uri
    from dst._tracking import TrackingUnavailable

    config = _load_config(args)
    storage_url = resolve_storage_url(args.storage)
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    create_study(config, storage_url, tracking_uri, store_tracking_uri=_tracking_uri_given(args))
    settings = WorkerSettings(
        study_name=config.name,
        storage_url=storage_url,
        tracking_uri=tracking_uri,
        data_dir=args.data_dir,
        device=args.device,
        num_workers=_non_negative(args.num_workers, "--num-workers"),
        checkpoint_dir=args.checkpoint_dir,
    )
    try:
        run_worker(settings)
    except TrackingUnavailable as error:
        print(f"dst study: error: {error}", file=sys.stderr)
        return 1
    _print_report(tracking_uri, config.name)
    return 0


def run_worker_command(args: argparse.Namespace) -> int:
    """Handle ``dst worker``."""
    from dst._study import WorkerSettings, run_worker
    from dst._study_storage import resolve_storage_url
    from dst._tracking import TrackingUnavailable

    settings = WorkerSettings(
        study_name=args.study,
        storage_url=resolve_storage_url(args.storage),
        tracking_uri=args.tracking_uri,
        data_dir=args.data_dir,
        device=args.device,
        num_workers=_non_negative(args.num_workers, "--num-workers"),
        checkpoint_dir=args.checkpoint_dir,
        heartbeat_interval=_positive(args.heartbeat_interval, "--heartbeat-interval"),
        grace_period=_positive(args.grace_period, "--grace-period"),
        max_retry=_non_negative(args.max_retry, "--max-retry"),
        spool_dir=args.spool_dir,
        outage_limit_s=_positive(args.outage_limit, "--outage-limit"),
    )
    if settings.grace_period <= settings.heartbeat_interval:
        raise UsageError(
            f"--grace-period {settings.grace_period} must exceed --heartbeat-interval"
            f" {settings.heartbeat_interval}; use at least twice the interval"
        )
    try:
        run_worker(settings)
    except TrackingUnavailable as error:
        print(f"dst worker: error: {error}", file=sys.stderr)
        return 1
    return 0


def run_replay(args: argparse.Namespace) -> int:
    """Handle ``dst replay``."""
    from dst._tracking import quiet_run_urls, replay_spool

    with quiet_run_urls():
        n_sent = replay_spool(args.file, args.tracking_uri)
    print(f"sent {n_sent} records of {args.file}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    """Handle ``dst report``."""
    from dst._report import build_report, render_report
    from dst._study_storage import resolve_tracking_uri
    from dst._tracking import check_tracking_uri

    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking_uri(tracking_uri, must_exist=True)
    fmt = args.format or _format_of(args.output)
    text = render_report(build_report(tracking_uri, args.study), fmt)
    if args.output is None:
        print(text)
        return 0
    try:
        args.output.write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot write --output {str(args.output)!r}: {error.strerror}") from None
    _logger.info("wrote the %s report of study %s to %s", fmt, args.study, args.output)
    return 0


def _format_of(output: Path | None) -> str:
    if output is None or output.suffix.lower() in ("", ".txt"):
        return "text"
    fmt = _SUFFIX_FORMATS.get(output.suffix.lower())
    if fmt is None:
        raise UsageError(
            f"unknown report suffix {output.suffix!r} of --output {str(output)!r}; name the"
            f" file .txt, {', '.join(_SUFFIX_FORMATS)}, or give --format"
        )
    return fmt


def _print_report(tracking_uri: str, study_name: str) -> None:
    from dst._report import build_report, render_report

    try:
        print(render_report(build_report(tracking_uri, study_name), "text"))
    except UsageError as error:
        _logger.warning("no report of study %s: %s", study_name, error)


def _load_config(args: argparse.Namespace) -> Any:
    from dst._study_file import Overrides, load_study_file, parse_seeds_argument
    from dst._train_cli import parse_options

    overrides = Overrides(
        n_epochs=args.n_epochs,
        n_trials=args.n_trials,
        seeds=parse_seeds_argument(args.seeds) if args.seeds is not None else None,
        options=parse_options(args.option),
        data_dir=args.data_dir,
    )
    return load_study_file(args.file, overrides)


def _tracking_uri_given(args: argparse.Namespace) -> bool:
    from dst._study_storage import TRACKING_URI_ENV

    return bool(args.tracking_uri or os.environ.get(TRACKING_URI_ENV))


def _positive(value: int, option: str) -> int:
    if value < 1:
        raise UsageError(f"{option} must be at least 1, got {value}")
    return value


def _non_negative(value: int, option: str) -> int:
    if value < 0:
        raise UsageError(f"{option} must be 0 or more, got {value}")
    return value
