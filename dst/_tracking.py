"""MLflow logging of studies: the run tree, one batched request per epoch, and artifacts.

Every study is an MLflow experiment of the same name with one parent run (tag
``dst.run_type=study``). Each trial is a child run of it. With several seeds, each seed is a
grandchild run. An STL row trains one ``stl_task`` run per task, under its seed run or,
with one seed, under the trial run. The runs that train carry the per-epoch metrics, with
step = epoch number, and finish with the summary metrics of their best epoch.

Params that do not apply to a run's scheduler (the lambdas and ``beta`` of ``mtl``, ``p`` of
``dst``, say) are logged as the empty string, so every run has the same param keys.

An ``stl_task`` run picks its best epoch on the validation error of the task it trains,
not on the average over all heads, because the other heads never train in that run. Its
``best_val_avg_error`` and ``test_avg_error_at_best`` are that task's own errors, and its
``*_at_best/<task>`` metrics cover that task only.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.entities import Metric, Param, RunStatus, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

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
from dst._trainer import Callback, EpochRecord, Trainer, TrainResult

_logger = logging.getLogger(__name__)

TAG_FAIL_REASON = "dst.fail_reason"
"""Tag on a FAILED run: why the trial failed (divergence, a stale worker, an error)."""
TAG_PARENT_RUN = "mlflow.parentRunId"
NOT_APPLICABLE = ""
"""Value of a param that does not apply to the run's scheduler."""

FINISHED = RunStatus.to_string(RunStatus.FINISHED)
FAILED = RunStatus.to_string(RunStatus.FAILED)
KILLED = RunStatus.to_string(RunStatus.KILLED)

_HEALTH_TIMEOUT_S = 5.0
_MAX_FAIL_REASON = 5000
_LOGGED_COMPONENTS = ("depth", "count", "incompleteness", "stagnancy")
"""Probability terms logged per epoch as ``p_<term>/<task>``; the regulariser is always 1."""


def check_tracking_uri(uri: str) -> None:
    """Raise UsageError unless the MLflow tracking server at an http(s) ``uri`` responds.

    Database and file URIs are checked when they are first used.
    """
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=_HEALTH_TIMEOUT_S) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise UsageError(
            f"MLflow tracking server {uri} does not respond ({reason}); start it or fix"
            " --tracking-uri / MLFLOW_TRACKING_URI"
        ) from None
    if status != 200:
        raise UsageError(
            f"MLflow tracking server {uri} returned HTTP {status} on /health; check that the"
            " URI points at an MLflow server"
        )


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """Return the id of the MLflow experiment ``name``, creating it when it does not exist.

    With a SQLite tracking URI the artifacts go to ``mlruns/<name>`` beside the database
    file, not to MLflow's default ``./mlruns`` in whatever folder the process runs in.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name, artifact_location=_sqlite_artifact_location(client.tracking_uri, name)
            )
        except MlflowException as error:
            # Another process created it between the lookup and the creation.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise error from None
    if experiment.lifecycle_stage == "deleted":
        raise UsageError(
            f"MLflow experiment {name!r} is deleted; restore it with 'mlflow experiments"
            " restore' or give the study another name"
        )
    return experiment.experiment_id


def _sqlite_artifact_location(tracking_uri: str, name: str) -> str | None:
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix) or tracking_uri == f"{prefix}:memory:":
        return None
    database = Path(tracking_uri.removeprefix(prefix).split("?", 1)[0]).resolve()
    folder = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return (database.parent / "mlruns" / folder).as_uri()


def find_parent_run(client: MlflowClient, experiment_id: str, study_name: str) -> str | None:
    """Return the id of the study's parent run, the oldest one if there are several."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_RUN_TYPE}` = 'study'",
        run_view_type=ViewType.ACTIVE_ONLY,
        order_by=["attributes.start_time ASC"],
        max_results=10,
    )
    matching = [run for run in runs if run.data.tags.get(TAG_STUDY_NAME) == study_name]
    return matching[0].info.run_id if matching else None


def create_parent_run(
    client: MlflowClient, experiment_id: str, study_name: str, config: Mapping[str, Any]
) -> str:
    """Create the study's parent run and log the resolved study config to it."""
    tags = {TAG_RUN_TYPE: "study", TAG_STUDY_NAME: study_name}
    run = client.create_run(experiment_id, tags=tags, run_name=f"study {study_name}")
    client.log_dict(run.info.run_id, dict(config), "study.json")
    _logger.info("created MLflow parent run %s of study %s", run.info.run_id, study_name)
    return run.info.run_id


@dataclass(frozen=True)
class RunSpec:
    """Settings of a run, logged as its params and as ``config.json``.

    ``seed`` is the seed of a run that trains, or the comma-joined seeds of a trial run
    with several seeds.
    """

    experiment: str
    options: Mapping[str, Any]
    scheduler: str
    lambdas: Sequence[float]
    beta: float
    count_metric: str
    p: float
    seed: str
    n_epochs: int
    lr: float
    batch_size: int

    def params(self) -> dict[str, str]:
        """Return the run's MLflow params as strings, see the module docstring."""
        dst_only = self.scheduler == "dst"
        params = {
            "experiment": self.experiment,
            "scheduler": self.scheduler,
            "beta": str(self.beta) if dst_only else NOT_APPLICABLE,
            "count_metric": self.count_metric if dst_only else NOT_APPLICABLE,
            "p": str(self.p) if self.scheduler == "random" else NOT_APPLICABLE,
            "seed": self.seed,
            "n_epochs": str(self.n_epochs),
            "lr": str(self.lr),
            "batch_size": str(self.batch_size),
        }
        names = ("depth", "count", "incompleteness", "stagnancy", "regularizer")
        for name, value in zip(names, self.lambdas, strict=True):
            params[f"lambda_{name}"] = str(value) if dst_only else NOT_APPLICABLE
        for key, value in self.options.items():
            # The core params above win over an option of the same name.
            params.setdefault(str(key), _param_text(value))
        return params


def _param_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)


class RunTree:
    """The MLflow runs of one trial attempt, so that a failure ends every open one.

    Runs are created RUNNING and end FINISHED one by one; :meth:`end_open` ends the rest
    with the trial's status when the attempt is pruned, fails or is interrupted.
    """

    def __init__(
        self, client: MlflowClient, experiment_id: str, study_name: str, trial_number: int
    ) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.study_name = study_name
        self.trial_number = trial_number
        self.open_runs: list[str] = []

    def create(
        self,
        parent_run_id: str,
        run_type: str,
        name: str,
        spec: RunSpec,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Create a RUNNING child run of ``parent_run_id`` with the params of ``spec``."""
        all_tags = {
            TAG_PARENT_RUN: parent_run_id,
            TAG_RUN_TYPE: run_type,
            TAG_STUDY_NAME: self.study_name,
            TAG_TRIAL_NUMBER: str(self.trial_number),
            **(tags or {}),
        }
        run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name)
        run_id = run.info.run_id
        params = [Param(key, value) for key, value in spec.params().items()]
        self.client.log_batch(run_id, params=params)
        self.client.log_dict(run_id, _spec_config(spec, all_tags), "config.json")
        self.open_runs.append(run_id)
        return run_id

    def set_tasks_tag(self, task_names: Sequence[str]) -> None:
        """Tag every open run with the ``[name, key]`` pairs of the tasks."""
        keys = task_keys(task_names)
        pairs = json.dumps([[name, key] for name, key in zip(task_names, keys, strict=True)])
        for run_id in self.open_runs:
            self.client.set_tag(run_id, TAG_TASKS, pairs)

    def finish(self, run_id: str) -> None:
        """End ``run_id`` FINISHED."""
        self.client.set_terminated(run_id, FINISHED)
        self.open_runs.remove(run_id)

    def end_open(self, status: str, reason: str | None = None) -> None:
        """End every open run with ``status``, tagging ``reason`` when one is given.

        Errors from MLflow are logged and not raised, so the trial's own error surfaces.
        """
        for run_id in reversed(self.open_runs):
            try:
                if reason:
                    self.client.set_tag(run_id, TAG_FAIL_REASON, reason[:_MAX_FAIL_REASON])
                self.client.set_terminated(run_id, status)
            except MlflowException as error:
                _logger.error("could not end MLflow run %s as %s: %s", run_id, status, error)
        self.open_runs.clear()


def row_tags(label: str) -> dict[str, str]:
    """Return the ``dst.row_label`` tag of an enqueued row, none for a sampled trial."""
    return {TAG_ROW_LABEL: label} if label else {}


def _spec_config(spec: RunSpec, tags: Mapping[str, str]) -> dict[str, Any]:
    return {
        "experiment": spec.experiment,
        "options": dict(spec.options),
        "scheduler": spec.scheduler,
        "lambdas": list(spec.lambdas),
        "beta": spec.beta,
        "count_metric": spec.count_metric,
        "p": spec.p,
        "seed": spec.seed,
        "n_epochs": spec.n_epochs,
        "lr": spec.lr,
        "batch_size": spec.batch_size,
        "tags": dict(tags),
    }


@dataclass(frozen=True)
class RunSummary:
    """Values of a run at its best epoch, chosen on validation.

    With ``task_index`` set (an ``stl_task`` run) the arrays hold that task only.
    """

    best_epoch: int
    best_val_avg_error: float
    test_avg_error_at_best: float
    val_errors: np.ndarray
    test_errors: np.ndarray
    test_metrics: np.ndarray
    task_index: int | None = None


def summarize(result: TrainResult, task_index: int | None = None) -> RunSummary:
    """Return the best-epoch values of a run, on one task's validation error for STL."""
    if task_index is None:
        return RunSummary(
            best_epoch=result.best_epoch,
            best_val_avg_error=result.best_val_avg_error,
            test_avg_error_at_best=result.test_avg_error_at_best,
            val_errors=result.best_val_errors,
            test_errors=result.test_errors_at_best,
            test_metrics=result.test_metrics_at_best,
        )
    errors = np.array([record.val_errors[task_index] for record in result.records])
    best_index = len(errors) - 1 if np.isnan(errors).all() else int(np.nanargmin(errors))
    best = result.records[best_index]
    return RunSummary(
        best_epoch=best.epoch,
        best_val_avg_error=float(best.val_errors[task_index]),
        test_avg_error_at_best=float(best.test_errors[task_index]),
        val_errors=best.val_errors[[task_index]],
        test_errors=best.test_errors[[task_index]],
        test_metrics=best.test_metrics[[task_index]],
        task_index=task_index,
    )


def summary_metrics(summary: RunSummary, keys: Sequence[str]) -> dict[str, float]:
    """Return the end-of-run metrics of ``summary``; ``keys`` are the keys of all tasks."""
    if summary.task_index is not None:
        keys = [keys[summary.task_index]]
    values = {
        "best_epoch": float(summary.best_epoch),
        "best_val_avg_error": summary.best_val_avg_error,
        "test_avg_error_at_best": summary.test_avg_error_at_best,
    }
    for index, key in enumerate(keys):
        values[f"val_error_at_best/{key}"] = float(summary.val_errors[index])
        values[f"test_error_at_best/{key}"] = float(summary.test_errors[index])
        values[f"test_metric_at_best/{key}"] = float(summary.test_metrics[index])
    return values


def log_metrics(client: MlflowClient, run_id: str, values: Mapping[str, float], step: int) -> None:
    """Log ``values`` to ``run_id`` at ``step`` in one ``log_batch`` request."""
    timestamp = int(time.time() * 1000)
    metrics = [Metric(key, float(value), timestamp, step) for key, value in values.items()]
    client.log_batch(run_id, metrics=metrics)


def epoch_metrics(record: EpochRecord, keys: Sequence[str]) -> dict[str, float]:
    """Return the per-epoch metrics of ``record``, keyed ``<value>/<task key>``."""
    values = {
        "val_avg_error": record.val_avg_error,
        "test_avg_error": record.test_avg_error,
        "epoch_seconds": record.seconds,
        "updated": float(record.updated),
    }
    per_task: dict[str, np.ndarray] = {
        "train_loss": record.train_losses,
        "probability": record.probabilities,
        "gate": record.gates.astype(float),
        "val_error": record.val_errors,
        "test_error": record.test_errors,
        "val_metric": record.val_metrics,
        "test_metric": record.test_metrics,
    }
    for name in _LOGGED_COMPONENTS:
        if name in record.components:
            per_task[f"p_{name}"] = record.components[name]
    for prefix, array in per_task.items():
        for key, value in zip(keys, array, strict=True):
            values[f"{prefix}/{key}"] = float(value)
    return values


class EpochLogger(Callback):
    """Trainer callback that logs one run: every epoch, the summary and the artifacts.

    Each epoch is one ``log_batch`` request with every metric of the epoch. At the end of
    training it logs the best-epoch metrics, ``epochs.csv`` and ``figure6.png``.

    NOTE: an MLflow error while logging fails the trial. Metrics are not yet buffered to a
    local file while the tracking server is unreachable.
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        tree: RunTree,
        task_index: int | None = None,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.tree = tree
        self.task_index = task_index
        self.task_names: list[str] = []
        self.keys: list[str] = []
        self.summary: RunSummary | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        self.task_names = [task.name for task in trainer.tasks]
        self.keys = task_keys(self.task_names)
        self.tree.set_tasks_tag(self.task_names)
        if self.task_index is not None:
            task_name = self.task_names[self.task_index]
            self.client.set_tag(self.run_id, TAG_STL_TASK, task_name)
            self.client.update_run(self.run_id, name=f"stl {task_name}")
        # Epochs restored from a checkpoint are logged again, so the run has every step.
        for record in trainer.records:
            self.on_epoch_end(trainer, record)

    def on_epoch_end(self, trainer: Trainer, record: EpochRecord) -> None:
        log_metrics(self.client, self.run_id, epoch_metrics(record, self.keys), record.epoch)

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        self.summary = summarize(result, self.task_index)
        log_metrics(self.client, self.run_id, summary_metrics(self.summary, self.keys), 0)
        rows = [record.as_dict(self.keys) for record in result.records]
        self.client.log_text(self.run_id, pd.DataFrame(rows).to_csv(index=False), "epochs.csv")
        figure = figure6(result.records, self.task_names)
        self.client.log_figure(self.run_id, figure, "figure6.png")


def log_mean_summary(client: MlflowClient, run_id: str, summaries: Sequence[RunSummary]) -> float:
    """Log the means over ``summaries`` (seeds, or the tasks of an STL seed) to ``run_id``.

    Returns the mean best validation average error, the value the trial reports.
    """
    values = {
        "best_val_avg_error": _nanmean(s.best_val_avg_error for s in summaries),
        "test_avg_error_at_best": _nanmean(s.test_avg_error_at_best for s in summaries),
    }
    log_metrics(client, run_id, values, 0)
    return values["best_val_avg_error"]


def merge_stl_summaries(summaries: Sequence[RunSummary], n_tasks: int) -> RunSummary:
    """Combine the per-task STL summaries of one seed into one summary over all tasks."""
    by_task = {summary.task_index: summary for summary in summaries}
    ordered = [by_task[index] for index in range(n_tasks)]
    return RunSummary(
        best_epoch=0,
        best_val_avg_error=_nanmean(s.best_val_avg_error for s in ordered),
        test_avg_error_at_best=_nanmean(s.test_avg_error_at_best for s in ordered),
        val_errors=np.concatenate([s.val_errors for s in ordered]),
        test_errors=np.concatenate([s.test_errors for s in ordered]),
        test_metrics=np.concatenate([s.test_metrics for s in ordered]),
    )


def log_stl_seed_summary(
    client: MlflowClient, run_id: str, summary: RunSummary, keys: Sequence[str]
) -> None:
    """Log the merged STL values of one seed, without a best epoch, which differs per task."""
    values = summary_metrics(summary, keys)
    del values["best_epoch"]
    log_metrics(client, run_id, values, 0)


def _nanmean(values: Iterable[float]) -> float:
    array = np.array(list(values), dtype=float)
    finite = array[~np.isnan(array)]
    return float(finite.mean()) if finite.size else math.nan


def figure6(records: Sequence[EpochRecord], task_names: Sequence[str]) -> Figure:
    """Draw, per task, the training loss, the activation probability and the active epochs.

    This is the layout of Figure 6 of the DST paper. A shaded epoch is one in which the
    task's gate was on, so the task trained. The probability at epoch ``k`` decides the
    gate of epoch ``k + 1``.
    """
    epochs = np.array([record.epoch for record in records])
    n_columns = min(len(task_names), 4)
    n_rows = math.ceil(len(task_names) / n_columns)
    # A fixed layout: matplotlib's layout engines take about twice as long to draw.
    figure = Figure(figsize=(4.6 * n_columns, 3.0 * n_rows + 0.6))
    figure.subplots_adjust(left=0.07, right=0.93, bottom=0.12, top=0.85, wspace=0.6, hspace=0.7)
    axes = figure.subplots(n_rows, n_columns, squeeze=False)
    for index, name in enumerate(task_names):
        axis = axes.flat[index]
        for record in records:
            if record.active[index]:
                axis.axvspan(
                    record.epoch - 0.5, record.epoch + 0.5, color="tab:green", alpha=0.15, lw=0
                )
        losses = [record.train_losses[index] for record in records]
        axis.plot(epochs, losses, color="tab:blue", marker=".", label="training loss")
        axis.set_title(name, fontsize="medium")
        axis.set_xlabel("epoch")
        axis.set_ylabel("training loss", color="tab:blue")
        probability_axis = axis.twinx()
        probabilities = [record.probabilities[index] for record in records]
        probability_axis.plot(epochs, probabilities, color="tab:orange", marker=".")
        probability_axis.set_ylim(-0.05, 1.05)
        probability_axis.set_ylabel("P(k, t)", color="tab:orange")
    for axis in axes.flat[len(task_names) :]:
        axis.set_visible(False)
    figure.suptitle("training loss, activation probability and active epochs (shaded)")
    return figure


def log_study_artifacts(
    client: MlflowClient, parent_run_id: str, tracking_uri: str, study: Any
) -> None:
    """Log the report and Optuna's plots to the study's parent run.

    Each part that cannot be built yet (no finished run, too few sampled trials) is
    skipped with a log line; none of them raises.
    """
    _log_report(client, parent_run_id, tracking_uri, study.study_name)
    _log_optuna_plots(client, parent_run_id, study)


def _log_report(client: MlflowClient, run_id: str, tracking_uri: str, study_name: str) -> None:
    try:
        from dst._report import build_report, render_report

        report = build_report(tracking_uri, study_name)
        for fmt, extension in (("markdown", "md"), ("csv", "csv"), ("html", "html")):
            client.log_text(run_id, render_report(report, fmt), f"report/report.{extension}")
    except (ImportError, UsageError, MlflowException, ValueError, KeyError) as error:
        _logger.warning("report of study %s not logged: %s", study_name, error)
        return
    _logger.info("logged the report of study %s to MLflow run %s", study_name, run_id)


def _log_optuna_plots(client: MlflowClient, run_id: str, study: Any) -> None:
    import optuna
    from optuna.visualization import plot_parallel_coordinate, plot_param_importances

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    sampled = [trial for trial in complete if trial.params]
    if len(sampled) < 2:
        _logger.info(
            "Optuna plots of study %s skipped: %d complete trials with sampled params, need 2",
            study.study_name,
            len(sampled),
        )
        return
    plots: dict[str, Callable[[Any], Any]] = {
        "optuna/param_importances.html": plot_param_importances,
        "optuna/parallel_coordinate.html": plot_parallel_coordinate,
    }
    for path, plot in plots.items():
        try:
            html = plot(study).to_html(include_plotlyjs=True, full_html=True)
        except (ValueError, RuntimeError, ImportError) as error:
            _logger.warning(
                "Optuna plot %s of study %s skipped: %s", path, study.study_name, error
            )
            continue
        client.log_text(run_id, html, path)
