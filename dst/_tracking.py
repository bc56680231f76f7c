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
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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
from dst._trainer import Callback, EpochRecord, Trainer, TrainResult, epochs_table

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


TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file")
"""URI schemes of the MLflow tracking stores that ``dst`` accepts (MLflow 3.x)."""


def check_tracking_uri(uri: str, *, must_exist: bool = False) -> None:
    """Raise UsageError unless ``uri`` names an MLflow tracking store that can be used.

    An http(s) server must respond on ``/health``. A SQLite file must exist when
    ``must_exist`` is set, so that reading a study never creates an empty database. Other
    database URIs are checked when they are first used.
    """
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
    if scheme not in TRACKING_SCHEMES:
        raise UsageError(
            f"invalid MLflow tracking URI {uri!r}; use http(s)://HOST:PORT for a server or"
            " sqlite:///FILE.db for a local store"
        )
    if scheme == "sqlite" and must_exist:
        path = uri.split("sqlite:///", 1)[-1]
        if path and path != ":memory:" and not Path(path).is_file():
            raise UsageError(
                f"MLflow store {uri!r} not found; run a study here first or give the"
                " --tracking-uri of the study"
            )
    if scheme not in ("http", "https"):
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

    Each epoch is one ``log_batch`` request with every metric of the epoch, sent on a
    background thread while the next epoch trains. At the end of training it logs the
    best-epoch metrics, ``epochs.csv`` and ``figure6.png``. After a training error, call
    :meth:`close_after_error` so the last request is not left open.

    Each epoch goes through a :class:`Delivery`, so an unreachable tracking server does not
    stop training: the epoch is kept on local disk and sent, in order, once the server
    responds again.

    NOTE: only the per-epoch metrics are kept locally. Creating and ending runs, the
    summary metrics and the artifacts still need the server. So the end of training first
    waits for the server with backoff, up to the delivery's outage limit.
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        tree: RunTree,
        task_index: int | None = None,
        delivery: Delivery | None = None,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.tree = tree
        self.task_index = task_index
        self.delivery = delivery
        self.task_names: list[str] = []
        self.keys: list[str] = []
        self.summary: RunSummary | None = None
        # One sender thread overlaps an epoch's request with the next epoch's training. The
        # next epoch end waits for it, so requests stay in order and at most one is open.
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dst-mlflow")
        self._pending: Future[None] | None = None

    def wait_for_pending(self) -> None:
        """Wait until the last epoch's request is sent, raising its error if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close_after_error(self) -> None:
        """Wait for the last epoch's request after training failed, logging its error."""
        try:
            self.wait_for_pending()
        except Exception as error:  # noqa: BLE001 - the training error is the one to raise
            _logger.error("last epoch of MLflow run %s was not logged: %s", self.run_id, error)
        self._sender.shutdown(wait=False)

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
        values = epoch_metrics(record, self.keys)
        self.wait_for_pending()
        self._pending = self._sender.submit(self._send, values, record.epoch)

    def _send(self, values: Mapping[str, float], step: int) -> None:
        if self.delivery is None:
            log_metrics(self.client, self.run_id, values, step)
            return
        self.delivery.log_metrics(self.run_id, values, step)

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        self.wait_for_pending()
        self._sender.shutdown(wait=False)
        if self.delivery is not None:
            self.delivery.drain()
        self.summary = summarize(result, self.task_index)
        log_metrics(self.client, self.run_id, summary_metrics(self.summary, self.keys), 0)
        table = epochs_table(result.records, self.keys)
        self.client.log_text(self.run_id, table.to_csv(index=False), "epochs.csv")
        figure = figure6(result.records, self.task_names)
        self.client.log_figure(self.run_id, figure, "figure6.png")


@contextmanager
def quiet_run_urls() -> Iterator[None]:
    """Stop MLflow from printing two "View run" lines to stdout whenever a run ends.

    MLflow prints them for an HTTP tracking URI unless MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT
    is set. A value that the user set stays in force.
    """
    name = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
    previous = os.environ.get(name)
    if previous is None:
        os.environ[name] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """Return the MLflow UI address of a run on an HTTP tracking server, else None."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


DEFAULT_OUTAGE_LIMIT_S = 600.0
"""Seconds a worker trains on while the tracking server does not respond, by default."""
_FAIL_FAST_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_MAX_BACKOFF_S = 30.0
_UNAVAILABLE_CODES = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")


class TrackingUnavailable(RuntimeError):
    """The tracking server did not respond within the outage limit; the epochs are on disk.

    ``spool_path`` is the file that ``dst replay`` sends.
    """

    def __init__(self, message: str, spool_path: Path | None) -> None:
        super().__init__(message)
        self.spool_path = spool_path


def keep_run_ends(path: Path, run_ids: Sequence[str], status: str, reason: str) -> None:
    """Append to the spool file at ``path`` the end of ``run_ids`` with ``status``.

    ``dst replay`` ends those runs after sending their epochs, so no run stays RUNNING.
    """
    with open(path, "a", encoding="utf-8") as file:
        for run_id in run_ids:
            record = {"run_id": run_id, "status": status, "reason": reason[:_MAX_FAIL_REASON]}
            file.write(json.dumps(record) + "\n")


@contextmanager
def _fail_fast() -> Iterator[None]:
    """Make MLflow's HTTP client fail at once instead of retrying for minutes.

    MLflow 3 reads these variables on every request; :class:`Delivery` retries itself.
    """
    previous = {name: os.environ.get(name) for name in _FAIL_FAST_ENV}
    os.environ.update(_FAIL_FAST_ENV)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _is_unavailable(error: Exception) -> bool:
    if isinstance(error, MlflowException):
        return error.error_code in _UNAVAILABLE_CODES
    return isinstance(error, OSError)


class Delivery:
    """Per-epoch metrics of a worker, sent at once or kept in a local file until they can be.

    While the server responds, each epoch is one ``log_batch`` request. When a request fails
    because the server does not respond, the epoch and every later one are appended to
    ``<spool_dir>/<run id>.jsonl`` and training goes on. Each later epoch first sends the
    kept epochs in order. After ``outage_limit_s`` seconds without a response,
    :class:`TrackingUnavailable` stops the worker; ``dst replay FILE`` sends the file later.
    """

    def __init__(
        self,
        client: MlflowClient,
        spool_dir: Path,
        outage_limit_s: float = DEFAULT_OUTAGE_LIMIT_S,
    ) -> None:
        self.client = client
        self.spool_dir = Path(spool_dir)
        self.outage_limit_s = outage_limit_s
        self.pending: list[dict[str, Any]] = []
        self.spool_path: Path | None = None
        self.down_since: float | None = None

    def log_metrics(self, run_id: str, values: Mapping[str, float], step: int) -> None:
        """Send one epoch's metrics, or keep them on disk while the server does not respond."""
        timestamp = int(time.time() * 1000)
        batch = {
            "run_id": run_id,
            "metrics": [[key, float(value), timestamp, step] for key, value in values.items()],
        }
        if not self.pending:
            if self._try_send(batch):
                return
            self._keep(batch)
        else:
            self._keep(batch)
            if self._flush():
                return
        self._check_outage()

    def drain(self) -> None:
        """Send every kept epoch, retrying with exponential backoff up to the outage limit."""
        delay = 1.0
        while self.pending and not self._flush():
            self._check_outage()
            _logger.warning(
                "MLflow server %s does not respond; %d epochs kept in %s, retrying in %.0f s",
                self.client.tracking_uri,
                len(self.pending),
                self.spool_path,
                delay,
            )
            time.sleep(delay)
            delay = min(2 * delay, _MAX_BACKOFF_S)

    def _try_send(self, batch: Mapping[str, Any]) -> bool:
        try:
            with _fail_fast():
                send_batch(self.client, batch)
        except (MlflowException, OSError) as error:
            if not _is_unavailable(error):
                raise
            if self.down_since is None:
                self.down_since = time.monotonic()
            _logger.warning(
                "MLflow server %s does not respond: %s", self.client.tracking_uri, error
            )
            return False
        return True

    def _keep(self, batch: dict[str, Any]) -> None:
        if self.spool_path is None:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            self.spool_path = self.spool_dir / f"{batch['run_id']}.jsonl"
            header = {"tracking_uri": self.client.tracking_uri}
            self.spool_path.write_text(json.dumps(header) + "\n", encoding="utf-8")
        with open(self.spool_path, "a", encoding="utf-8") as file:
            file.write(json.dumps(batch) + "\n")
        self.pending.append(batch)
        _logger.warning(
            "kept epoch %d of MLflow run %s in %s (%d epochs waiting)",
            batch["metrics"][0][3] if batch["metrics"] else 0,
            batch["run_id"],
            self.spool_path,
            len(self.pending),
        )

    def _flush(self) -> bool:
        while self.pending:
            if not self._try_send(self.pending[0]):
                _rewrite_spool(self.spool_path, self.client.tracking_uri, self.pending)
                return False
            self.pending.pop(0)
        if self.spool_path is not None:
            _logger.info(
                "MLflow server %s responds again; sent every kept epoch of %s",
                self.client.tracking_uri,
                self.spool_path,
            )
            self.spool_path.unlink(missing_ok=True)
            self.spool_path = None
        self.down_since = None
        return True

    def _check_outage(self) -> None:
        if self.down_since is None:
            return
        waited = time.monotonic() - self.down_since
        if waited < self.outage_limit_s:
            return
        raise TrackingUnavailable(
            f"MLflow server {self.client.tracking_uri} did not respond for {waited:.0f} s;"
            f" {len(self.pending)} epochs are kept in {self.spool_path}; send them with"
            f" 'dst replay {self.spool_path}' once the server runs",
            self.spool_path,
        )


def send_batch(client: MlflowClient, batch: Mapping[str, Any]) -> None:
    """Send one kept record: an epoch in one ``log_batch`` request, or the end of a run."""
    if "status" in batch:
        client.set_tag(batch["run_id"], TAG_FAIL_REASON, batch["reason"])
        client.set_terminated(batch["run_id"], batch["status"])
        return
    metrics = [
        Metric(key, value, timestamp, step) for key, value, timestamp, step in batch["metrics"]
    ]
    client.log_batch(batch["run_id"], metrics=metrics)


def _rewrite_spool(
    path: Path | None, tracking_uri: str, pending: Sequence[Mapping[str, Any]]
) -> None:
    if path is None:
        return
    lines = [json.dumps({"tracking_uri": tracking_uri})] + [json.dumps(batch) for batch in pending]
    temporary = path.with_suffix(".tmp")
    temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def replay_spool(path: Path, tracking_uri: str | None = None) -> int:
    """Send the records kept in the spool file at ``path`` in order, then delete it.

    Returns the number of records sent: epochs, then the ends of runs, if any.

    Raises:
        UsageError: The file is missing or not a spool file, or the server does not respond.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0])
        batches = [json.loads(line) for line in lines[1:] if line.strip()]
    except (OSError, IndexError, json.JSONDecodeError) as error:
        raise UsageError(
            f"cannot read the spool file {str(path)!r} ({error}); give a .jsonl file that a"
            " worker wrote while MLflow did not respond"
        ) from None
    uri = tracking_uri or header.get("tracking_uri")
    if not uri:
        raise UsageError(f"spool file {str(path)!r} names no tracking URI; pass --tracking-uri")
    check_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    for index, batch in enumerate(batches):
        if "status" in batch:
            # The kept reason asks for this replay, so add that the replay has run.
            replayed = f" (kept epochs sent later by 'dst replay {Path(path).name}')"
            batch = {**batch, "reason": batch["reason"] + replayed}
        try:
            send_batch(client, batch)
        except MlflowException as error:
            _rewrite_spool(Path(path), uri, batches[index:])
            raise UsageError(
                f"MLflow server {uri} rejected record {index + 1} of {str(path)!r}: {error};"
                " the unsent records stay in the file"
            ) from None
    Path(path).unlink()
    _logger.info("sent %d kept records of %s to %s", len(batches), path, uri)
    return len(batches)


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
