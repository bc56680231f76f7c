"""MLflow logging: batched epochs, summaries, artifacts and run statuses, on a real store."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port  # noqa: E402 - tests/ is on sys.path under pytest
from mlflow.tracking import MlflowClient

from dst import UsageError, create_experiment
from dst._names import task_keys
from dst._tracking import (
    EpochLogger,
    RunSpec,
    RunTree,
    check_tracking_uri,
    create_parent_run,
    epoch_metrics,
    figure6,
    find_parent_run,
    get_or_create_experiment,
    merge_stl_summaries,
    summarize,
)
from dst._trainer import EpochRecord, TrainConfig, TrainResult, train_experiment

TINY_SHAPES = {"n_samples": 96, "image_size": 16, "width": 4}


class CountingClient(MlflowClient):
    """A real MLflow client that records the size of every ``log_batch`` request."""

    def __init__(self, tracking_uri: str) -> None:
        super().__init__(tracking_uri=tracking_uri)
        self.metric_batches: list[int] = []

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):  # type: ignore[override]
        if metrics:
            self.metric_batches.append(len(metrics))
        return super().log_batch(run_id, metrics, params, tags, synchronous=synchronous)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SQLite MLflow store shared by the tests of this module."""
    folder = tmp_path_factory.mktemp("mlflow")
    yield f"sqlite:///{folder / 'mlflow.db'}"


def spec(scheduler: str = "dst") -> RunSpec:
    return RunSpec(
        experiment="shapes",
        options={"n_samples": 96, "tags": ["a", "b"]},
        scheduler=scheduler,
        lambdas=(0.2, 0.2, 0.2, 0.2, 0.2),
        beta=0.1,
        count_metric="proportional",
        p=0.5,
        seed="0",
        n_epochs=3,
        lr=0.002,
        batch_size=32,
    )


def record(epoch: int, val_errors: list[float], n_tasks: int = 3) -> EpochRecord:
    errors = np.array(val_errors, dtype=float)
    return EpochRecord(
        epoch=epoch,
        updated=epoch > 1,
        active=np.ones(n_tasks, dtype=bool),
        train_losses=np.full(n_tasks, 1.0 / epoch),
        probabilities=np.full(n_tasks, 0.5),
        components={"depth": np.ones(n_tasks), "regularizer": np.ones(n_tasks)},
        gates=np.array([True, False, True][:n_tasks]),
        val_metrics=100 - errors,
        val_errors=errors,
        val_avg_error=float(errors.mean()),
        test_metrics=100 - errors - 1,
        test_errors=errors + 1,
        test_avg_error=float(errors.mean() + 1),
        seconds=0.5,
    )


def test_epoch_logger_sends_one_request_per_epoch(tracking_uri):
    client = CountingClient(tracking_uri)
    experiment_id = get_or_create_experiment(client, "logger")
    parent = create_parent_run(client, experiment_id, "logger", {"n_trials": 1})
    tree = RunTree(client, experiment_id, "logger", trial_number=0)
    run_id = tree.create(parent, "trial", "trial 0", spec())
    client.metric_batches.clear()
    logger = EpochLogger(client, run_id, tree)
    experiment = create_experiment("shapes", TINY_SHAPES)
    _, result = train_experiment(experiment, "dst", TrainConfig(n_epochs=3), callbacks=[logger])
    tree.finish(run_id)

    n_tasks = len(result.best_val_errors)
    per_epoch = 4 + n_tasks * 11  # 4 scalars, 11 values per task
    assert client.metric_batches == [per_epoch] * 3 + [3 + 3 * n_tasks]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["best_epoch"] == result.best_epoch
    assert run.data.metrics["best_val_avg_error"] == pytest.approx(result.best_val_avg_error)
    names = json.loads(run.data.tags["dst.tasks"])
    assert [name for name, _ in names] == logger.task_names
    history = client.get_metric_history(run_id, f"gate/{names[0][1]}")
    assert [metric.step for metric in history] == [1, 2, 3]
    artifacts = {info.path for info in client.list_artifacts(run_id)}
    assert artifacts == {"config.json", "epochs.csv", "figure6.png"}
    csv = Path(client.download_artifacts(run_id, "epochs.csv")).read_text().splitlines()
    assert len(csv) == 4
    assert f"active/{names[0][1]}" in csv[0]


def test_params_not_applicable_are_empty():
    mtl = spec("mtl").params()
    assert mtl["lambda_depth"] == ""
    assert mtl["beta"] == ""
    assert mtl["p"] == ""
    assert mtl["count_metric"] == ""
    dst = spec("dst").params()
    assert dst["lambda_regularizer"] == "0.2"
    assert dst["beta"] == "0.1"
    assert dst["p"] == ""
    assert spec("random").params()["p"] == "0.5"
    assert dst["tags"] == '["a", "b"]'
    assert dst["n_samples"] == "96"


def test_epoch_metrics_skip_constant_regularizer():
    values = epoch_metrics(record(2, [10.0, 20.0, 30.0]), ["a", "b", "c"])
    assert values["p_depth/a"] == 1.0
    assert "p_regularizer/a" not in values
    assert values["gate/b"] == 0.0
    assert values["updated"] == 1.0
    assert values["val_avg_error"] == pytest.approx(20.0)


def test_stl_summary_picks_own_task_best_epoch():
    records = [record(1, [50.0, 10.0, 30.0]), record(2, [20.0, 40.0, 45.0])]
    result = TrainResult.from_records(records)
    assert result.best_epoch == 1  # on the average
    summary = summarize(result, task_index=0)
    assert summary.best_epoch == 2
    assert summary.best_val_avg_error == 20.0
    assert summary.test_avg_error_at_best == 21.0
    assert summary.val_errors.tolist() == [20.0]


def test_merged_stl_summary_averages_tasks():
    records = [record(1, [50.0, 10.0, 30.0]), record(2, [20.0, 40.0, 45.0])]
    result = TrainResult.from_records(records)
    summaries = [summarize(result, task_index=index) for index in (2, 0, 1)]
    merged = merge_stl_summaries(summaries, 3)
    assert merged.val_errors.tolist() == [20.0, 10.0, 30.0]
    assert merged.best_val_avg_error == pytest.approx(20.0)
    assert merged.test_errors.tolist() == [21.0, 11.0, 31.0]


def test_figure6_draws_one_panel_per_task():
    names = ["kind", "a/b", "pose", "x", "y"]
    figure = figure6([record(1, [1.0] * 5, 5), record(2, [2.0] * 5, 5)], names)
    titled = [axis.get_title() for axis in figure.axes if axis.get_visible() and axis.get_title()]
    assert titled == names


def test_run_tree_end_open_marks_status_and_reason(tracking_uri):
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = get_or_create_experiment(client, "tree")
    parent = create_parent_run(client, experiment_id, "tree", {})
    tree = RunTree(client, experiment_id, "tree", trial_number=4)
    trial = tree.create(parent, "trial", "trial 4", spec(), {"dst.row_label": "row"})
    finished = tree.create(trial, "seed", "seed 0", spec())
    tree.finish(finished)
    failing = tree.create(trial, "seed", "seed 1", spec())
    tree.end_open("FAILED", "DivergedError: loss of task 'a' is nan at epoch 3")
    assert client.get_run(finished).info.status == "FINISHED"
    for run_id in (trial, failing):
        run = client.get_run(run_id)
        assert run.info.status == "FAILED"
        assert run.data.tags["dst.fail_reason"].startswith("DivergedError")
        assert run.data.tags["optuna.trial_number"] == "4"
    assert client.get_run(trial).data.tags["dst.row_label"] == "row"
    assert tree.open_runs == []


def test_parent_run_is_found_by_tag(tracking_uri):
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = get_or_create_experiment(client, "parent")
    assert get_or_create_experiment(client, "parent") == experiment_id
    assert find_parent_run(client, experiment_id, "parent") is None
    run_id = create_parent_run(client, experiment_id, "parent", {"n_trials": 3})
    assert find_parent_run(client, experiment_id, "parent") == run_id
    assert "study.json" in {info.path for info in client.list_artifacts(run_id)}


def test_deleted_experiment_raises_usage_error(tracking_uri):
    client = MlflowClient(tracking_uri=tracking_uri)
    client.delete_experiment(get_or_create_experiment(client, "deleted"))
    with pytest.raises(UsageError, match="MLflow experiment 'deleted' is deleted"):
        get_or_create_experiment(client, "deleted")


def test_unreachable_tracking_server_raises_one_line():
    port = free_port()
    with pytest.raises(UsageError) as raised:
        check_tracking_uri(f"http://127.0.0.1:{port}")
    message = str(raised.value)
    assert f"http://127.0.0.1:{port} does not respond" in message
    assert "\n" not in message


def test_task_keys_of_awkward_names_are_logged():
    keys = task_keys(["Japanese_(hiragana)", "a/b", "a_b"])
    values = epoch_metrics(record(1, [1.0, 2.0, 3.0]), keys)
    assert not any(math.isnan(value) for value in values.values())
    assert "val_error/a_b-2" in values
