"""The Table 9 report: one row per enqueued study row or sampled trial, built from MLflow runs.

The report reads every run of the study's MLflow experiment in one paged search and groups
the runs in pandas:

- each FINISHED trial run (tag ``dst.run_type=trial``) is one row, named by its
  ``dst.row_label`` tag or, for a sampled trial, ``trial <n>``;
- the row's values come from the trial's FINISHED seed runs when it has any, else from the
  trial run itself (a study with one seed);
- a seed or trial run with FINISHED ``stl_task`` children (an STL row) takes each task's
  values from the child that trained that task, and its average error is the mean of those
  task errors.

Runs that are not FINISHED, and the children of such runs, are left out, so a retried trial
appears once. Each value is the mean and the sample standard deviation (ddof 1) over seeds.

The rows of Table 9 of the DST paper (A. Malhotra, M. Vatsa, R. Singh, "Dropped Scheduled
Task: Mitigating Negative Transfer in Multi-task Learning using Dynamic Task Dropping", TMLR
2022) are recognised by scheduler and lambdas rather than by label, so a study file may word
its labels freely. Only labelled rows (``[[enqueue]]``) are placed this way: a trial without a
label, drawn by the sampler or run with the study's fixed settings, is a sampled trial even
when its lambdas equal a Table 9 row. The DST rows also need the proportional count term,
because the inverse count is a different ablation. Rows come in this order: traditional
MTL, the 15 DST rows of Table 9, random drop at 0.5 and 0.75, STL, the other labelled rows in
enqueue order, then the sampled trials by average error, lowest first. CSV output also has a
``p`` column, set on random rows only.
"""

from __future__ import annotations

import html
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param, Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dst import _tracking
from dst._errors import UsageError
from dst._names import (
    TAG_ROW_LABEL,
    TAG_RUN_TYPE,
    TAG_STL_TASK,
    TAG_STUDY_NAME,
    TAG_TASKS,
    TAG_TRIAL_NUMBER,
    task_keys,
)

_logger = logging.getLogger(__name__)

FORMATS = ("csv", "html", "markdown", "text")
"""The formats that :func:`render_report` writes."""

NEGATIVE_TRANSFER_MARK = "▲"
"""Mark on a gap above 0: the task does worse than when trained alone."""

_PAGE_SIZE = 1000
_MAX_LISTED_EXPERIMENTS = 50
_TAG_PARENT_RUN = "mlflow.parentRunId"
_FINISHED = "FINISHED"
_AVG_ERROR = "test_avg_error_at_best"
_METRIC_PREFIX = "test_metric_at_best/"
_ERROR_PREFIX = "test_error_at_best/"

_LAMBDA_PARAMS = {
    "lambda_d": "lambda_depth",
    "lambda_c": "lambda_count",
    "lambda_u": "lambda_incompleteness",
    "lambda_r": "lambda_stagnancy",
    "lambda_b": "lambda_regularizer",
}
_LAMBDA_COLUMNS = tuple(_LAMBDA_PARAMS)
_SETTING_HEADERS = {
    "lambda_d": "λd",
    "lambda_c": "λc",
    "lambda_u": "λu",
    "lambda_r": "λr",
    "lambda_b": "λb",
    "beta": "β",
}

_TABLE9_DST_ROWS: tuple[tuple[str, tuple[float, ...]], ...] = (
    ("leave one out", (0.0, 0.25, 0.25, 0.25, 0.25)),
    ("leave one out", (0.25, 0.0, 0.25, 0.25, 0.25)),
    ("leave one out", (0.25, 0.25, 0.0, 0.25, 0.25)),
    ("leave one out", (0.25, 0.25, 0.25, 0.0, 0.25)),
    ("leave one out", (0.25, 0.25, 0.25, 0.25, 0.0)),
    ("only static", (1.0, 0.0, 0.0, 0.0, 0.0)),
    ("only static", (0.0, 1.0, 0.0, 0.0, 0.0)),
    ("only dynamic", (0.0, 0.0, 1.0, 0.0, 0.0)),
    ("only dynamic", (0.0, 0.0, 0.0, 1.0, 0.0)),
    ("varying, no regulariser", (0.2, 0.2, 0.3, 0.3, 0.0)),
    ("varying, no regulariser", (0.1, 0.1, 0.4, 0.4, 0.0)),
    ("varying, no regulariser", (0.4, 0.4, 0.1, 0.1, 0.0)),
    ("varying, with regulariser", (0.15, 0.15, 0.3, 0.3, 0.1)),
    ("varying, with regulariser", (0.3, 0.3, 0.15, 0.15, 0.1)),
    ("proposed", (0.2, 0.2, 0.2, 0.2, 0.2)),
)
_RANDOM_PROBABILITIES = (0.5, 0.75)
_LAMBDA_TOLERANCE = 1e-6

# Sections of the row order, see the module docstring.
_SECTION_TABLE9 = 0
_SECTION_LABELLED = 1
_SECTION_SAMPLED = 2


def build_report(
    tracking_uri: str, study_name: str, *, page_size: int = _PAGE_SIZE
) -> pd.DataFrame:
    """Build the Table 9 report of a study from the FINISHED runs of its MLflow experiment.

    Args:
        tracking_uri: MLflow tracking URI, such as ``http://127.0.0.1:5000`` or
            ``sqlite:///mlflow.db``.
        study_name: The study name, which is also the MLflow experiment name.
        page_size: Runs per search request; the search pages through all runs.

    Returns:
        One row per labelled study row or sampled trial, in the order of the module
        docstring, with these columns:

        - ``row``, ``group``, ``scheduler`` and ``trial`` (the trial number);
        - ``lambda_d``, ``lambda_c``, ``lambda_u``, ``lambda_r``, ``lambda_b`` and ``beta``,
          NaN where they do not apply;
        - per task name, ``metric_mean/<task>``, ``metric_std/<task>``, ``error_mean/<task>``
          and ``gap/<task>``, the error minus the STL row's error (NaN without an STL row);
        - ``avg_error_mean``, ``avg_error_std`` and ``n_seeds``.

        ``df.attrs`` contains ``study``, ``tasks`` (the task names) and ``stl_row`` (the label
        of the row that the gaps compare with, or None).

    Raises:
        UsageError: The study has no MLflow experiment, or no finished trial run.
    """
    started = time.perf_counter()
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = _find_experiment_id(client, tracking_uri, study_name)
    runs = _search_runs(client, experiment_id, page_size)
    trials = _finished_trials(runs)
    if trials.empty:
        raise UsageError(
            f"study {study_name!r} has no finished runs in MLflow at {tracking_uri};"
            " run a worker first"
        )
    tasks = _study_tasks(trials, runs)
    units = _value_units(runs, trials, tasks)
    report = _assemble_rows(trials, units, tasks, _first_trial_numbers(runs))
    report = _add_gaps(_sort_rows(report), tasks)
    report.attrs = {
        "study": study_name,
        "tasks": _display_names(tasks),
        "stl_row": _stl_reference(report),
    }
    _logger.info(
        "report of study %s: %d rows from %d runs in %.1f s",
        study_name,
        len(report),
        len(runs),
        time.perf_counter() - started,
    )
    return report


def _find_experiment_id(client: MlflowClient, tracking_uri: str, study_name: str) -> str:
    # NOTE: with MLflow 3.17's default of 7 HTTP retries with backoff, an unreachable tracking
    # server takes about 4 minutes to fail here. Callers may check the URI first.
    try:
        experiment = client.get_experiment_by_name(study_name)
    except MlflowException as error:
        raise UsageError(
            f"cannot read MLflow at {tracking_uri}: {error.message}; check --tracking-uri"
        ) from error
    if experiment is not None and experiment.lifecycle_stage == "active":
        return experiment.experiment_id
    page = client.search_experiments(max_results=_MAX_LISTED_EXPERIMENTS)
    listed = ", ".join(sorted(experiment.name for experiment in page)) or "none"
    if page.token:
        listed += " and more"
    raise UsageError(
        f"study {study_name!r} not found in MLflow at {tracking_uri}; existing studies:"
        f" {listed}; check the study name and the tracking URI"
    )


def _search_runs(client: MlflowClient, experiment_id: str, page_size: int) -> pd.DataFrame:
    """Return one record per active run of the experiment, every status included."""
    records: list[dict[str, Any]] = []
    page_token: str | None = None
    while True:
        page = client.search_runs(
            [experiment_id],
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=page_size,
            page_token=page_token,
        )
        records.extend(_run_record(run) for run in page)
        _logger.debug("read %d runs of experiment %s", len(records), experiment_id)
        page_token = page.token
        if not page_token:
            break
    columns = ["run_id", "status", "start_time", "parent_id", "run_type", "label"]
    return pd.DataFrame.from_records(records, columns=None if records else columns)


def _run_record(run: Run) -> dict[str, Any]:
    tags, params = run.data.tags, run.data.params
    record: dict[str, Any] = {
        "run_id": run.info.run_id,
        "status": run.info.status,
        "start_time": run.info.start_time,
        "parent_id": tags.get(_TAG_PARENT_RUN),
        "run_type": tags.get(TAG_RUN_TYPE),
        "label": tags.get(TAG_ROW_LABEL) or None,
        "trial_number": _parse_float(tags.get(TAG_TRIAL_NUMBER)),
        "stl_task": tags.get(TAG_STL_TASK),
        "tasks": tags.get(TAG_TASKS),
        "scheduler": params.get("scheduler", ""),
        "count_metric": params.get("count_metric", ""),
        "p": _parse_float(params.get("p")),
        "beta": _parse_float(params.get("beta")),
    }
    for column, name in _LAMBDA_PARAMS.items():
        record[column] = _parse_float(params.get(name))
    for key, value in run.data.metrics.items():
        if key == _AVG_ERROR or key.startswith((_METRIC_PREFIX, _ERROR_PREFIX)):
            record[key] = value
    return record


def _parse_float(text: str | None) -> float:
    """Return the number in a param or tag value, or NaN for a missing or empty value."""
    try:
        return float(text) if text is not None else math.nan
    except ValueError:
        return math.nan


def _finished_trials(runs: pd.DataFrame) -> pd.DataFrame:
    """Return the FINISHED trial runs, one per row label, each with its ``row`` name."""
    trials = runs[(runs["run_type"] == "trial") & (runs["status"] == _FINISHED)].copy()
    if trials.empty:
        return trials
    sampled = "trial " + trials["trial_number"].map(lambda number: f"{number:.0f}")
    trials["row"] = trials["label"].fillna(sampled)
    trials = trials.sort_values("start_time", kind="stable")
    duplicated = trials["row"].duplicated(keep="last")
    for row in sorted(set(trials.loc[duplicated, "row"])):
        _logger.warning("row %r has several finished trial runs; the report uses the last", row)
    return trials[~duplicated]


def _first_trial_numbers(runs: pd.DataFrame) -> dict[str, float]:
    """Return the lowest trial number of each label over all attempts, the enqueue order."""
    labelled = runs[(runs["run_type"] == "trial") & runs["label"].notna()]
    return labelled.groupby("label")["trial_number"].min().to_dict()


def _study_tasks(trials: pd.DataFrame, runs: pd.DataFrame) -> list[tuple[str, str]]:
    """Return the ``(name, key)`` pairs of the study's tasks, in task order."""
    pairs: dict[str, str] = {}
    for text in trials.sort_values("trial_number")["tasks"].dropna().unique():
        for name, key in json.loads(text):
            pairs.setdefault(key, name)
    if not pairs:
        # Without the dst.tasks tag the metric keys are the only names there are.
        for column in runs.columns:
            if column.startswith(_ERROR_PREFIX):
                key = column.removeprefix(_ERROR_PREFIX)
                pairs.setdefault(key, key)
    return [(name, key) for key, name in pairs.items()]


def _display_names(tasks: Sequence[tuple[str, str]]) -> list[str]:
    """Return the task names, or the keys where two tasks share a name."""
    names = [name for name, _ in tasks]
    if len(set(names)) == len(names):
        return names
    return [key for _, key in tasks]


def _value_units(
    runs: pd.DataFrame, trials: pd.DataFrame, tasks: Sequence[tuple[str, str]]
) -> pd.DataFrame:
    """Return one record per seed of each trial, with ``trial_run_id`` and its values."""
    finished = runs[runs["status"] == _FINISHED]
    seeds = finished[
        (finished["run_type"] == "seed") & finished["parent_id"].isin(trials["run_id"])
    ]
    seeds = seeds.assign(trial_run_id=seeds["parent_id"])
    single = trials[~trials["run_id"].isin(seeds["parent_id"])]
    single = single.assign(trial_run_id=single["run_id"])
    units = pd.concat([seeds, single], ignore_index=True)
    # A value that no run logged is NaN, so every task has its columns.
    units = units.reindex(columns=list(dict.fromkeys([*units.columns, *_value_columns(tasks)])))
    stl_runs = finished[
        (finished["run_type"] == "stl_task") & finished["parent_id"].isin(units["run_id"])
    ]
    return _apply_stl_values(units, stl_runs, tasks)


def _value_columns(tasks: Sequence[tuple[str, str]]) -> list[str]:
    metric_columns = [_METRIC_PREFIX + key for _, key in tasks]
    error_columns = [_ERROR_PREFIX + key for _, key in tasks]
    return [_AVG_ERROR, *metric_columns, *error_columns]


def _apply_stl_values(
    units: pd.DataFrame, stl_runs: pd.DataFrame, tasks: Sequence[tuple[str, str]]
) -> pd.DataFrame:
    """Replace the values of each unit with STL children by those of its per-task runs."""
    if stl_runs.empty:
        return units
    key_of = {name: key for name, key in tasks}
    units = units.set_index("run_id")
    for record in stl_runs.to_dict("records"):
        key = key_of.get(record["stl_task"])
        if key is None:
            _logger.warning(
                "STL run %s trained unknown task %r", record["run_id"], record["stl_task"]
            )
            continue
        for prefix in (_METRIC_PREFIX, _ERROR_PREFIX):
            units.loc[record["parent_id"], prefix + key] = record.get(prefix + key, math.nan)
    stl_units = units.index.isin(stl_runs["parent_id"])
    error_columns = [_ERROR_PREFIX + key for _, key in tasks]
    units.loc[stl_units, _AVG_ERROR] = units.loc[stl_units, error_columns].mean(axis=1)
    return units.reset_index()


def _assemble_rows(
    trials: pd.DataFrame,
    units: pd.DataFrame,
    tasks: Sequence[tuple[str, str]],
    first_numbers: Mapping[str, float],
) -> pd.DataFrame:
    """Return one report row per trial run: its settings and the mean and std over seeds."""
    grouped = units.groupby("trial_run_id")[_value_columns(tasks)]
    mean, std, n_seeds = grouped.mean(), grouped.std(ddof=1), grouped.size()
    trials = trials.set_index("run_id")
    report = pd.DataFrame(
        {
            "row": trials["row"],
            "group": "",
            "scheduler": trials["scheduler"],
            "trial": trials["trial_number"].astype("Int64"),
            **{column: trials[column] for column in (*_LAMBDA_COLUMNS, "beta")},
            # Two random rows differ only in p; the text formats show it in the row labels.
            "p": trials["p"].where(trials["scheduler"] == "random"),
        }
    )
    for name, (_, key) in zip(_display_names(tasks), tasks, strict=True):
        report[f"metric_mean/{name}"] = mean[_METRIC_PREFIX + key]
        report[f"metric_std/{name}"] = std[_METRIC_PREFIX + key]
        report[f"error_mean/{name}"] = mean[_ERROR_PREFIX + key]
    report["avg_error_mean"] = mean[_AVG_ERROR]
    report["avg_error_std"] = std[_AVG_ERROR]
    report["n_seeds"] = n_seeds.reindex(report.index).fillna(0).astype(int)
    return _add_order(report, trials, first_numbers)


def _add_order(
    report: pd.DataFrame, trials: pd.DataFrame, first_numbers: Mapping[str, float]
) -> pd.DataFrame:
    """Add the ``group`` and the private sort columns ``_section``, ``_slot``, ``_order``."""
    placements = [
        _placement(trial, report.at[run_id, "avg_error_mean"], first_numbers)
        for run_id, trial in trials.iterrows()
    ]
    columns = ["_section", "_slot", "_order", "group"]
    placed = pd.DataFrame(placements, index=trials.index, columns=columns)
    return report.assign(**{column: placed[column] for column in columns})


def _placement(
    trial: pd.Series, avg_error: float, first_numbers: Mapping[str, float]
) -> tuple[int, int, float, str]:
    """Return ``(section, slot, order within the slot, group)`` of a trial's row."""
    if pd.isna(trial["label"]):
        return _SECTION_SAMPLED, 0, avg_error, "sampled"
    enqueue_order = first_numbers.get(trial["label"], trial["trial_number"])
    position = _table9_position(trial)
    if position is None:
        return _SECTION_LABELLED, 0, enqueue_order, ""
    slot, group = position
    return _SECTION_TABLE9, slot, enqueue_order, group


def _table9_position(trial: pd.Series) -> tuple[int, str] | None:
    """Return ``(slot, group)`` of a trial that is one of Table 9's rows or baselines."""
    scheduler = trial["scheduler"]
    if scheduler == "mtl":
        return 0, "traditional MTL"
    if scheduler == "dst" and trial["count_metric"] in ("", "proportional"):
        lambdas = [trial[column] for column in _LAMBDA_COLUMNS]
        for index, (group, expected) in enumerate(_TABLE9_DST_ROWS):
            if all(_is_close(a, b) for a, b in zip(lambdas, expected, strict=True)):
                return 1 + index, group
    if scheduler == "random":
        for index, p in enumerate(_RANDOM_PROBABILITIES):
            if _is_close(trial["p"], p):
                return 1 + len(_TABLE9_DST_ROWS) + index, "random drop"
    if scheduler == "stl":
        return 1 + len(_TABLE9_DST_ROWS) + len(_RANDOM_PROBABILITIES), "STL"
    return None


def _is_close(value: float, expected: float) -> bool:
    return math.isclose(value, expected, abs_tol=_LAMBDA_TOLERANCE)


def _sort_rows(report: pd.DataFrame) -> pd.DataFrame:
    """Sort by section, Table 9 slot and then enqueue order or average error."""
    report = report.assign(_trial=report["trial"].astype(float))
    ordered = report.sort_values(
        ["_section", "_slot", "_order", "_trial"], kind="stable", na_position="last"
    )
    return ordered.drop(columns=["_section", "_slot", "_order", "_trial"]).reset_index(drop=True)


def _stl_reference(report: pd.DataFrame) -> str | None:
    """Return the label of the first STL row, the reference of the gaps, or None."""
    stl_rows = report.loc[report["scheduler"] == "stl", "row"]
    return None if stl_rows.empty else str(stl_rows.iloc[0])


def _add_gaps(report: pd.DataFrame, tasks: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """Add ``gap/<task>``: the row's mean error minus the first STL row's, NaN without one."""
    stl_positions = np.flatnonzero(report["scheduler"] == "stl")
    gaps = {}
    for name in _display_names(tasks):
        errors = report[f"error_mean/{name}"]
        if len(stl_positions) == 0:
            gaps[f"gap/{name}"] = pd.Series(math.nan, index=report.index)
        else:
            gaps[f"gap/{name}"] = errors - errors.iloc[stl_positions[0]]
    return report.assign(**gaps)


def render_report(df: pd.DataFrame, fmt: str) -> str:
    """Render a report from :func:`build_report` as ``markdown``, ``csv``, ``html`` or ``text``.

    CSV keeps the numeric columns of ``df``, so that other tools can read them. The other
    formats show each value as ``mean ± std`` with two decimals, mark negative transfer with
    ``▲`` and end with footnotes that explain the columns.

    Raises:
        UsageError: ``fmt`` is not one of :data:`FORMATS`.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown report format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "csv":
        return df.to_csv(index=False)
    table = _display_table(df)
    notes = _footnotes(df)
    if fmt == "markdown":
        return _markdown_table(table) + "\n" + "".join(f"\n{note}\n" for note in notes)
    if fmt == "html":
        return _html_document(df, table, notes)
    return _text_table(table) + "\n\n" + "\n".join(notes) + "\n"


def _display_table(df: pd.DataFrame) -> pd.DataFrame:
    """Return the report as strings, with the displayed columns in display order."""
    names = _report_task_names(df)
    table = pd.DataFrame({"row": df["row"].astype(str), "group": _blank_repeats(df["group"])})
    for column, header in _SETTING_HEADERS.items():
        table[header] = df[column].map(_format_setting)
    for name in names:
        table[name] = _format_spread(df[f"metric_mean/{name}"], df[f"metric_std/{name}"])
    table["avg error"] = _format_spread(df["avg_error_mean"], df["avg_error_std"])
    table["seeds"] = df["n_seeds"].astype(str)
    if df.attrs.get("stl_row") is not None:
        for name in names:
            table[f"{name} gap"] = df[f"gap/{name}"].map(_format_gap)
    return table


def _report_task_names(df: pd.DataFrame) -> list[str]:
    return [
        column.removeprefix("metric_mean/") for column in df if column.startswith("metric_mean/")
    ]


def _blank_repeats(groups: pd.Series) -> pd.Series:
    """Return the group names with a repeat of the row above left blank, as in Table 9."""
    return groups.where(groups != groups.shift(), "").astype(str)


def _format_setting(value: float) -> str:
    """Return a lambda or beta with 3 significant digits; CSV keeps every digit."""
    return "-" if math.isnan(value) else f"{value:.3g}"


def _format_spread(means: pd.Series, stds: pd.Series) -> list[str]:
    cells = []
    for mean, std in zip(means, stds, strict=True):
        if math.isnan(mean):
            cells.append("-")
        elif math.isnan(std):
            cells.append(f"{mean:.2f}")
        else:
            cells.append(f"{mean:.2f} ± {std:.2f}")
    return cells


def _format_gap(gap: float) -> str:
    if math.isnan(gap):
        return "-"
    return f"{gap:+.2f} {NEGATIVE_TRANSFER_MARK}" if gap > 0 else f"{gap:+.2f}"


def _footnotes(df: pd.DataFrame) -> list[str]:
    reference = df.attrs.get("stl_row")
    notes = [
        "Task columns: the test metric at the epoch of lowest validation average error."
        " avg error: the mean of the task errors (%) at that epoch. Each value is the mean"
        " ± sample standard deviation over the seeds counted in the seeds column.",
        "Order: traditional MTL and the DST rows of Table 9 (labelled rows, recognised by"
        " scheduler and lambdas), random drop, STL, other labelled rows in enqueue order,"
        " then the unlabelled (sampled) trials by avg error, lowest first.",
    ]
    if reference is None:
        notes.append("The study has no STL row, so the table shows no gap to STL.")
    else:
        notes.append(
            f"gap: the task's test error minus that of the STL row {reference!r}, in"
            f" percentage points. {NEGATIVE_TRANSFER_MARK} marks negative transfer: a gap"
            " above 0, where the task does worse than when trained alone."
        )
    return notes


def _text_table(table: pd.DataFrame) -> str:
    """Return the table as aligned text, with the row and group names aligned left."""
    if table.empty:
        return "(no rows)"
    padded = table.copy()
    for column in ("row", "group"):
        width = max(len(column), padded[column].str.len().max())
        padded[column] = padded[column].str.ljust(width)
    return padded.to_string(index=False, justify="left")


def _markdown_table(table: pd.DataFrame) -> str:
    def line(cells: Iterable[str]) -> str:
        escaped = (str(cell).replace("|", "\\|") for cell in cells)
        return "| " + " | ".join(escaped) + " |"

    header = line(table.columns)
    rule = "|" + "|".join(" --- " for _ in table.columns) + "|"
    body = [line(row) for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def _html_document(df: pd.DataFrame, table: pd.DataFrame, notes: Sequence[str]) -> str:
    title = html.escape(f"Study {df.attrs.get('study', '')}".strip())
    items = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>{title}</title></head><body>\n<h1>{title}</h1>\n"
        f"{table.to_html(index=False, escape=True, border=0)}\n<ol>{items}</ol>\n"
        "</body></html>\n"
    )


# MLflow takes at most 1000 values per batch and at most 100 of them params.
_METRICS_PER_BATCH = 900
_PARAMS_PER_BATCH = 100
_FAILED_ATTEMPT_OFFSET = 50.0


@dataclass(frozen=True)
class _SyntheticTrial:
    """One trial for :func:`_log_synthetic_study`: its settings and its test errors.

    ``errors[seed][task]`` is the test error in percent, and the metric is ``100 - error``.
    ``failed_attempt`` adds an attempt that ends FAILED, with errors 50 points higher and
    FINISHED children, as a trial that Optuna retried leaves behind.
    """

    errors: tuple[tuple[float, ...], ...]
    label: str | None = None
    scheduler: str = "dst"
    lambdas: tuple[float, ...] | None = (0.2, 0.2, 0.2, 0.2, 0.2)
    beta: float | None = 0.1
    p: float | None = None
    count_metric: str = "proportional"
    status: str = _FINISHED
    failed_attempt: bool = False


def _log_synthetic_study(
    tracking_uri: str,
    study_name: str,
    trials: Sequence[_SyntheticTrial],
    task_names: Sequence[str],
    *,
    n_epochs: int = 0,
    n_threads: int = 4,
) -> str:
    """Log a study's runs to MLflow as a worker would, without training, and return the id.

    Trial ``i`` gets trial number ``i``, and the retry of a failed attempt gets a number after
    all trials, as Optuna's retry callback gives it. Each run is created with its tags, gets
    its values in one batch (more above MLflow's batch limits) and is terminated, and
    ``n_threads`` trials are logged at once. With ``n_epochs`` above 0 every run that trains
    also gets the per-epoch metrics.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.create_experiment(study_name)
    parent_tags = {TAG_RUN_TYPE: "study", TAG_STUDY_NAME: study_name}
    parent = client.create_run(experiment_id, tags=parent_tags, run_name=study_name)
    logger = _SyntheticLogger(client, experiment_id, study_name, task_names, n_epochs)
    attempts: list[tuple[_SyntheticTrial, int, str, float]] = []
    n_retries = 0
    for number, trial in enumerate(trials):
        if trial.failed_attempt:
            attempts.append((trial, number, "FAILED", _FAILED_ATTEMPT_OFFSET))
            attempts.append((trial, len(trials) + n_retries, trial.status, 0.0))
            n_retries += 1
        else:
            attempts.append((trial, number, trial.status, 0.0))
    with _tracking.quiet_run_urls(), ThreadPoolExecutor(max_workers=n_threads) as pool:
        list(pool.map(lambda attempt: logger.log_trial(parent.info.run_id, *attempt), attempts))
        client.set_terminated(parent.info.run_id, _FINISHED)
    return experiment_id


def _random_synthetic_trials(
    n_trials: int, n_seeds: int, n_tasks: int, seed: int = 0
) -> list[_SyntheticTrial]:
    """Return sampled DST trials with lambdas drawn on the simplex and random errors."""
    rng = np.random.default_rng(seed)
    trials = []
    for _ in range(n_trials):
        lambdas = tuple(float(value) for value in rng.dirichlet(np.ones(5)))
        errors = rng.uniform(5.0, 30.0, size=(n_seeds, n_tasks))
        trials.append(
            _SyntheticTrial(
                errors=tuple(
                    tuple(float(value) for value in seed_errors) for seed_errors in errors
                ),
                lambdas=lambdas,
                beta=float(rng.uniform(0.0, 1.0)),
            )
        )
    return trials


class _SyntheticLogger:
    """Writer of synthetic trial runs, named and nested as ``dst worker`` logs them."""

    def __init__(
        self,
        client: MlflowClient,
        experiment_id: str,
        study_name: str,
        task_names: Sequence[str],
        n_epochs: int,
    ) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.study_name = study_name
        self.task_names = list(task_names)
        self.keys = task_keys(task_names)
        self.tasks_json = json.dumps(
            [list(pair) for pair in zip(task_names, self.keys, strict=True)]
        )
        self.n_epochs = n_epochs

    def log_trial(
        self, parent_id: str, trial: _SyntheticTrial, number: int, status: str, offset: float
    ) -> None:
        """Log one attempt of a trial: its trial run, seed runs and STL runs."""
        tags = {
            TAG_STUDY_NAME: self.study_name,
            TAG_TRIAL_NUMBER: str(number),
            TAG_TASKS: self.tasks_json,
        }
        if trial.label is not None:
            tags[TAG_ROW_LABEL] = trial.label
        trial_id = self._create(parent_id, "trial", tags)
        errors = np.asarray(trial.errors, dtype=float) + offset
        if len(errors) == 1:
            self._log_unit(trial_id, trial, 0, errors[0])
        else:
            for seed, seed_errors in enumerate(errors):
                seed_id = self._create(trial_id, "seed", {})
                self._log_unit(seed_id, trial, seed, seed_errors)
                self.client.set_terminated(seed_id, _FINISHED)
            means = [
                Metric("best_val_avg_error", float(errors.mean()) + 1.0, 0, 0),
                Metric(_AVG_ERROR, float(errors.mean()), 0, 0),
            ]
            self._log(trial_id, means, self._params(trial, 0))
        self.client.set_terminated(trial_id, status)

    def _create(self, parent_id: str, run_type: str, tags: Mapping[str, str]) -> str:
        all_tags = {**tags, TAG_RUN_TYPE: run_type, _TAG_PARENT_RUN: parent_id}
        run = self.client.create_run(self.experiment_id, tags=all_tags)
        return run.info.run_id

    def _log_unit(
        self, run_id: str, trial: _SyntheticTrial, seed: int, errors: np.ndarray
    ) -> None:
        """Log the values of one seed: on ``run_id``, or on one child per task for STL."""
        if trial.scheduler != "stl":
            metrics = self._final_metrics(range(len(self.keys)), errors)
            self._log(run_id, metrics + self._epoch_metrics(), self._params(trial, seed))
            return
        self._log(run_id, [], self._params(trial, seed))
        for index, name in enumerate(self.task_names):
            child_id = self._create(run_id, "stl_task", {TAG_STL_TASK: name})
            metrics = self._final_metrics([index], errors)
            self._log(child_id, metrics + self._epoch_metrics(), self._params(trial, seed))
            self.client.set_terminated(child_id, _FINISHED)

    def _final_metrics(self, indices: Sequence[int], errors: np.ndarray) -> list[Metric]:
        average = float(np.mean([errors[index] for index in indices]))
        metrics = [
            Metric("best_epoch", float(max(self.n_epochs, 1)), 0, 0),
            Metric("best_val_avg_error", average + 1.0, 0, 0),
            Metric(_AVG_ERROR, average, 0, 0),
        ]
        for index in indices:
            key, error = self.keys[index], float(errors[index])
            metrics.append(Metric(_METRIC_PREFIX + key, 100.0 - error, 0, 0))
            metrics.append(Metric(_ERROR_PREFIX + key, error, 0, 0))
            metrics.append(Metric(f"val_error_at_best/{key}", error + 1.0, 0, 0))
        return metrics

    def _epoch_metrics(self) -> list[Metric]:
        per_task = [
            *("train_loss", "probability", "p_depth", "p_count", "p_incompleteness"),
            *("p_stagnancy", "gate", "val_error", "test_error", "val_metric", "test_metric"),
        ]
        metrics = []
        for epoch in range(1, self.n_epochs + 1):
            value = 1.0 / epoch
            for name in ("val_avg_error", "test_avg_error", "epoch_seconds", "updated"):
                metrics.append(Metric(name, value, 0, epoch))
            for key in self.keys:
                metrics.extend(Metric(f"{name}/{key}", value, 0, epoch) for name in per_task)
        return metrics

    def _params(self, trial: _SyntheticTrial, seed: int) -> list[Param]:
        lambdas = trial.lambdas or ("",) * len(_LAMBDA_PARAMS)
        values: dict[str, Any] = {
            "experiment": "synthetic",
            "scheduler": trial.scheduler,
            **dict(zip(_LAMBDA_PARAMS.values(), lambdas, strict=True)),
            "beta": "" if trial.beta is None else trial.beta,
            "seed": seed,
            "n_epochs": self.n_epochs,
            "lr": 1e-3,
            "batch_size": 32,
            "p": "" if trial.p is None else trial.p,
            "count_metric": trial.count_metric,
        }
        return [Param(key, str(value)) for key, value in values.items()]

    def _log(self, run_id: str, metrics: Sequence[Metric], params: Sequence[Param]) -> None:
        """Log ``metrics`` and ``params`` in as few batches as MLflow's limits allow."""
        timestamp = int(time.time() * 1000)
        metrics = [Metric(m.key, m.value, timestamp, m.step) for m in metrics]
        n_batches = max(
            math.ceil(len(metrics) / _METRICS_PER_BATCH),
            math.ceil(len(params) / _PARAMS_PER_BATCH),
            1,
        )
        for index in range(n_batches):
            self.client.log_batch(
                run_id,
                metrics=metrics[index * _METRICS_PER_BATCH : (index + 1) * _METRICS_PER_BATCH],
                params=params[index * _PARAMS_PER_BATCH : (index + 1) * _PARAMS_PER_BATCH],
            )
