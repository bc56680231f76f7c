"""Tests of the multi-task trainer on a tiny two-task experiment defined here."""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from dst import (
    Callback,
    DivergedError,
    EpochRecord,
    Experiment,
    ExperimentData,
    MultiTaskModel,
    Task,
    TrainConfig,
    Trainer,
    TrainResult,
    UsageError,
    make_scheduler,
    train_experiment,
)
from dst._metrics import Accuracy, NormalisedError, cross_entropy, mse
from dst._scheduler import MTLScheduler, RandomScheduler, STLScheduler
from dst._trainer import CHECKPOINT_NAME, static_task_weights

N_FEATURES = 4
N_CLASSES = 3


class TinyDataset(Dataset):
    """Items ``(x, (regression target, class), mask)`` with NaN and -1 as placeholders."""

    def __init__(self, inputs: Tensor, values: Tensor, classes: Tensor, mask: Tensor) -> None:
        self.inputs = inputs
        self.values = torch.where(mask[:, 0:1], values, torch.full_like(values, math.nan))
        self.classes = torch.where(mask[:, 1], classes, torch.full_like(classes, -1))
        self.mask = mask

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor]:
        return self.inputs[index], (self.values[index], self.classes[index]), self.mask[index]


class TinyModel(MultiTaskModel):
    """A linear shared layer with dropout, a regression head and a classification head."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(N_FEATURES, 8), nn.ReLU(), nn.Dropout(dropout))
        self.heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, N_CLASSES)])
        self.poisoned = False

    def shared(self, inputs: Tensor) -> Tensor:
        features = self.encoder(inputs)
        return features * math.nan if self.poisoned else features


class TinyExperiment(Experiment):
    """Two tasks on 4 random features: a regression labelled for 2/3 of the samples and a
    3-class classification labelled for ``class_fraction`` of them."""

    name = "tiny"
    defaults = {"n_samples": 96, "class_fraction": 0.75, "dropout": 0.1}
    train_defaults = {"lr": 0.01, "batch_size": 16}

    def load(self, seed: int) -> ExperimentData:
        generator = torch.Generator().manual_seed(1234)
        n_samples = self.options["n_samples"]
        inputs = torch.randn(n_samples, N_FEATURES, generator=generator)
        values = inputs @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]])
        classes = (inputs[:, 0] > 0).long() + (inputs[:, 1] > 0).long()
        labelled = torch.rand(n_samples, 2, generator=torch.Generator().manual_seed(seed))
        mask = torch.stack(
            [labelled[:, 0] < 2 / 3, labelled[:, 1] < self.options["class_fraction"]], dim=1
        )
        splits = np.split(np.arange(n_samples), [n_samples // 2, 3 * n_samples // 4])
        datasets = [TinyDataset(inputs[i], values[i], classes[i], mask[i]) for i in splits]
        train_mask = datasets[0].mask
        tasks = [
            Task("reg", "regression", mse, lambda: NormalisedError(scale=1.0), 2, 1),
            Task("cls", "classification", cross_entropy, Accuracy, 3, 1),
        ]
        tasks = [
            Task(task.name, task.kind, task.loss, task.metric, task.depth, int(count))
            for task, count in zip(tasks, train_mask.sum(dim=0).tolist(), strict=True)
        ]
        return ExperimentData(tasks, datasets[0], datasets[1], datasets[2])

    def build_model(self, tasks: Sequence[Task]) -> TinyModel:
        return TinyModel(self.options["dropout"])


def make_trainer(
    scheduler_name: str = "dst",
    tmp_path: Path | None = None,
    n_epochs: int = 3,
    callbacks: Sequence[Callback] = (),
    **options: Any,
) -> Trainer:
    """Build a trainer of the tiny experiment on the CPU with seed 0."""
    torch.manual_seed(0)
    experiment = TinyExperiment(**options)
    data = experiment.load(0)
    model = experiment.build_model(data.tasks)
    scheduler = make_scheduler(scheduler_name, data.tasks, stl_task="reg", p=0.5)
    config = TrainConfig(
        n_epochs=n_epochs, lr=0.01, batch_size=16, device="cpu", checkpoint_dir=tmp_path
    )
    return Trainer(data, model, scheduler, config, callbacks)


def parameters_of(module: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in module.named_parameters()}


def assert_same_parameters(before: dict[str, Tensor], module: nn.Module) -> None:
    for name, value in module.named_parameters():
        assert torch.equal(value, before[name]), f"parameter {name} changed"


def test_task_losses_are_masked_means() -> None:
    trainer = make_trainer()
    inputs = torch.randn(5, N_FEATURES)
    values = torch.tensor([[1.0], [math.nan], [3.0], [math.nan], [-1.0]])
    classes = torch.tensor([2, -1, 0, 1, -1])
    mask = torch.tensor([[1, 0], [0, 0], [1, 1], [0, 1], [1, 0]], dtype=torch.bool)
    active = np.array([True, True])
    trainer.model.eval()  # no dropout, so the hand computation uses the same features

    losses = trainer.task_losses(inputs, [values, classes], mask, active)

    with torch.no_grad():
        features = trainer.model.shared(inputs)
        predicted = trainer.model.heads[0](features)[:, 0]
        logits = trainer.model.heads[1](features)
    rows = [0, 2, 4]
    expected_regression = ((predicted[rows] - values[rows, 0]) ** 2).mean()
    log_probabilities = logits.log_softmax(dim=1)
    expected_classification = -(log_probabilities[2, 0] + log_probabilities[3, 1]) / 2
    assert torch.isfinite(losses[0])
    assert losses[0].item() == pytest.approx(expected_regression.item(), rel=1e-6)
    assert losses[1].item() == pytest.approx(expected_classification.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("loss", "shape"),
    [
        (lambda output, target: (output - target) ** 2, "(5, 1)"),
        (lambda output, target: ((output[:, 0] - target[:, 0]) ** 2).mean(), "()"),
    ],
)
def test_loss_of_wrong_shape_is_usage_error(loss: Any, shape: str) -> None:
    trainer = make_trainer()
    trainer.tasks[0] = replace(trainer.tasks[0], loss=loss)
    inputs = torch.randn(5, N_FEATURES)
    targets = [torch.randn(5, 1), torch.tensor([0, 1, 2, 0, 1])]
    mask = torch.ones(5, 2, dtype=torch.bool)

    expected = f"task 'reg' returned shape {shape}, expected (5,)"
    with pytest.raises(UsageError, match=re.escape(expected)):
        trainer.task_losses(inputs, targets, mask, np.array([True, True]))


def test_task_without_labels_in_batch_contributes_nothing() -> None:
    trainer = make_trainer()
    inputs = torch.randn(3, N_FEATURES)
    values = torch.full((3, 1), math.nan)
    classes = torch.tensor([0, 1, 2])
    mask = torch.tensor([[0, 1], [0, 1], [0, 1]], dtype=torch.bool)

    losses = trainer.task_losses(inputs, [values, classes], mask, np.array([True, True]))
    sum(losses).backward()

    assert losses[0].item() == 0.0
    regression_head = trainer.model.heads[0]
    assert torch.count_nonzero(regression_head.weight.grad) == 0
    assert torch.count_nonzero(regression_head.bias.grad) == 0
    for name, parameter in trainer.model.named_parameters():
        assert torch.isfinite(parameter.grad).all(), f"gradient of {name} is not finite"


def test_dropped_head_builds_no_graph() -> None:
    trainer = make_trainer()
    inputs = torch.randn(4, N_FEATURES)
    values = torch.randn(4, 1)
    classes = torch.tensor([0, 1, 2, 0])
    mask = torch.ones(4, 2, dtype=torch.bool)

    losses = trainer.task_losses(inputs, [values, classes], mask, np.array([True, False]))

    assert losses[0].requires_grad
    assert not losses[1].requires_grad


def test_dropped_head_parameters_stay_unchanged() -> None:
    trainer = make_trainer("stl", n_epochs=2)
    dropped_head = parameters_of(trainer.model.heads[1])
    trained_head = parameters_of(trainer.model.heads[0])
    encoder = parameters_of(trainer.model.encoder)

    result = trainer.fit()

    assert result.records[1].active.tolist() == [True, False]
    assert result.records[1].updated
    assert_same_parameters(dropped_head, trainer.model.heads[1])
    for parameter in trainer.model.heads[1].parameters():
        assert parameter.grad is None
    for name, value in trainer.model.heads[0].named_parameters():
        assert not torch.equal(value, trained_head[name]), f"active head {name} did not change"
    for name, value in trainer.model.encoder.named_parameters():
        assert not torch.equal(value, encoder[name]), f"shared {name} did not change"


def test_dropped_task_loss_is_still_measured() -> None:
    trainer = make_trainer("stl", n_epochs=2)

    result = trainer.fit()

    assert np.isfinite(result.records[1].train_losses).all()
    assert result.records[1].train_losses[1] > 0


def test_estimation_epoch_changes_no_parameter() -> None:
    trainer = make_trainer(n_epochs=1)
    before = parameters_of(trainer.model)

    result = trainer.fit()

    record = result.records[0]
    assert record.epoch == 1
    assert not record.updated
    assert not record.active.any()
    assert np.isfinite(record.train_losses).all()
    assert_same_parameters(before, trainer.model)


def test_all_gates_off_epoch_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    experiment = TinyExperiment()
    data = experiment.load(0)
    model = experiment.build_model(data.tasks)
    config = TrainConfig(n_epochs=2, lr=0.01, batch_size=16, device="cpu")
    trainer = Trainer(data, model, RandomScheduler(2, 0.0), config)
    before = parameters_of(model)

    with caplog.at_level(logging.INFO, logger="dst._trainer"):
        result = trainer.fit()

    record = result.records[1]
    assert not record.active.any()
    assert not record.updated
    assert np.isfinite(record.train_losses).all()
    assert_same_parameters(before, model)
    assert "epoch 2: every gate is off, so the epoch makes no update" in caplog.text


def test_static_weights_scale_to_mean_loss() -> None:
    weights = static_task_weights(np.array([1.0, 3.0]), enabled=True)

    assert weights.tolist() == [2.0, 2.0 / 3.0]


def test_static_weights_guard_zero_loss() -> None:
    weights = static_task_weights(np.array([0.0, 2.0, 4.0]), enabled=True)

    assert weights.tolist() == [1.0, 1.0, 0.5]


def test_static_weights_off_are_ones() -> None:
    weights = static_task_weights(np.array([1.0, 3.0]), enabled=False)

    assert weights.tolist() == [1.0, 1.0]


def test_trainer_sets_static_weights_from_first_epoch() -> None:
    trainer = make_trainer(n_epochs=1)

    result = trainer.fit()

    first_losses = result.records[0].train_losses
    expected = first_losses.mean() / first_losses
    np.testing.assert_allclose(trainer.task_weights.cpu().numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("scheduler_name", ["dst", "random"])
def test_resume_matches_uninterrupted_run(tmp_path: Path, scheduler_name: str) -> None:
    experiment = TinyExperiment()
    straight_dir, split_dir = tmp_path / "straight", tmp_path / "split"
    straight, straight_result = train_experiment(
        experiment,
        scheduler_name,
        TrainConfig(n_epochs=4, device="cpu", checkpoint_dir=straight_dir),
    )
    train_experiment(
        experiment, scheduler_name, TrainConfig(n_epochs=2, device="cpu", checkpoint_dir=split_dir)
    )

    resumed, resumed_result = train_experiment(
        experiment,
        scheduler_name,
        TrainConfig(n_epochs=4, device="cpu", checkpoint_dir=split_dir),
        resume_from=split_dir / CHECKPOINT_NAME,
    )

    assert [record.epoch for record in resumed_result.records] == [1, 2, 3, 4]
    for expected, actual in zip(straight_result.records, resumed_result.records, strict=True):
        assert actual.active.tolist() == expected.active.tolist()
        assert actual.gates.tolist() == expected.gates.tolist()
        assert actual.train_losses.tolist() == expected.train_losses.tolist()
        assert actual.probabilities.tolist() == expected.probabilities.tolist()
        assert actual.val_errors.tolist() == expected.val_errors.tolist()
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), f"{name} differs"


def test_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path=tmp_path, n_epochs=2)
    trainer.fit()

    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)

    assert len(state["records"]) == 2
    assert state["gates"] == trainer.gates.tolist()
    assert sorted(path.name for path in tmp_path.iterdir()) == [CHECKPOINT_NAME]


def test_interrupt_during_save_keeps_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = make_trainer(tmp_path=tmp_path, n_epochs=3)
    save = torch.save

    def save_interrupted(state: Any, file: Any) -> None:
        # Ctrl-C arrives once the write has begun.
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        save(state, file)

    monkeypatch.setattr(torch, "save", save_interrupted)

    with pytest.raises(KeyboardInterrupt):
        trainer.fit()

    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert len(state["records"]) == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == [CHECKPOINT_NAME]


def test_resume_of_missing_checkpoint_is_usage_error(tmp_path: Path) -> None:
    trainer = make_trainer()

    with pytest.raises(UsageError, match="not found"):
        trainer.resume(tmp_path / CHECKPOINT_NAME)


def test_resume_with_other_seed_is_usage_error(tmp_path: Path) -> None:
    make_trainer(tmp_path=tmp_path, n_epochs=1).fit()
    trainer = make_trainer()
    trainer.config.seed = 1

    with pytest.raises(UsageError, match="resume with --seed 0"):
        trainer.resume(tmp_path / CHECKPOINT_NAME)


def make_record(epoch: int, val_avg_error: float, test_avg_error: float) -> EpochRecord:
    errors = np.array([val_avg_error, val_avg_error])
    return EpochRecord(
        epoch=epoch,
        updated=epoch > 1,
        active=np.array([epoch > 1, epoch > 1]),
        train_losses=np.array([1.0, 1.0]),
        probabilities=np.array([1.0, 1.0]),
        components={},
        gates=np.array([True, True]),
        val_metrics=100 - errors,
        val_errors=errors,
        val_avg_error=val_avg_error,
        test_metrics=100 - np.array([test_avg_error] * 2),
        test_errors=np.array([test_avg_error] * 2),
        test_avg_error=test_avg_error,
        seconds=0.1,
    )


def test_best_epoch_is_chosen_on_validation() -> None:
    records = [make_record(1, 50.0, 50.0), make_record(2, 20.0, 40.0), make_record(3, 30.0, 5.0)]

    result = TrainResult.from_records(records)

    assert result.best_epoch == 2
    assert result.best_val_avg_error == 20.0
    assert result.test_avg_error_at_best == 40.0
    assert result.test_errors_at_best.tolist() == [40.0, 40.0]


def test_best_epoch_takes_first_of_ties() -> None:
    records = [make_record(1, 50.0, 50.0), make_record(2, 20.0, 40.0), make_record(3, 20.0, 5.0)]

    assert TrainResult.from_records(records).best_epoch == 2


def test_fit_result_uses_lowest_validation_epoch() -> None:
    result = make_trainer(n_epochs=4).fit()

    val_avg_errors = [record.val_avg_error for record in result.records]
    assert result.best_epoch == int(np.argmin(val_avg_errors)) + 1
    assert result.best_val_avg_error == min(val_avg_errors)


def test_nan_loss_raises_diverged_error() -> None:
    class Poison(Callback):
        def on_epoch_end(self, trainer: Trainer, record: EpochRecord) -> None:
            trainer.model.poisoned = True

    trainer = make_trainer("mtl", n_epochs=3, callbacks=[Poison()])

    with pytest.raises(DivergedError) as caught:
        trainer.fit()

    assert caught.value.task == "reg"
    assert caught.value.epoch == 2
    assert math.isnan(caught.value.value)


def test_task_without_training_labels_is_usage_error() -> None:
    trainer = make_trainer("mtl", class_fraction=0.0)

    with pytest.raises(UsageError, match="task 'cls' has no labelled sample"):
        trainer.fit()


def test_callbacks_run_in_order(tmp_path: Path) -> None:
    events: list[str] = []

    class Recorder(Callback):
        def on_train_start(self, trainer: Trainer) -> None:
            events.append("start")

        def on_epoch_end(self, trainer: Trainer, record: EpochRecord) -> None:
            events.append(f"epoch {record.epoch}")

        def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
            events.append(f"checkpoint {path.name}")

        def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
            events.append(f"end {len(result.records)}")

    make_trainer(tmp_path=tmp_path, n_epochs=2, callbacks=[Recorder()]).fit()

    assert events == [
        "start",
        f"checkpoint {CHECKPOINT_NAME}",
        "epoch 1",
        f"checkpoint {CHECKPOINT_NAME}",
        "epoch 2",
        "end 2",
    ]


def test_evaluation_counts_only_labelled_samples() -> None:
    trainer = make_trainer()

    _, errors = trainer.evaluate("test")

    dataset = trainer.data.test
    labelled = dataset.mask[:, 1]
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(dataset.inputs)[1]
    correct = (logits.argmax(dim=1) == dataset.classes)[labelled]
    assert errors[1] == pytest.approx(100.0 - 100.0 * correct.float().mean().item())


def test_epoch_record_as_dict_is_flat() -> None:
    record = make_record(2, 20.0, 40.0)
    record.components = {"depth": np.array([0.5, 1.0])}

    row = record.as_dict(["a", "b"])

    assert row["epoch"] == 2.0
    assert row["gate/b"] == 1.0
    assert row["p_depth/a"] == 0.5
    assert row["val_error/a"] == 20.0
    assert all(isinstance(value, float) for value in row.values())


def test_epoch_record_state_round_trip() -> None:
    record = make_record(3, 20.0, 40.0)
    record.components = {"depth": np.array([0.5, 1.0])}

    restored = EpochRecord.from_state(record.to_state())

    assert restored.as_dict(["a", "b"]) == record.as_dict(["a", "b"])
    assert restored.gates.dtype == bool


def test_mtl_trains_every_task_after_first_epoch() -> None:
    result = make_trainer("mtl", n_epochs=3).fit()

    assert [record.updated for record in result.records] == [False, True, True]
    assert result.records[2].active.tolist() == [True, True]


def test_scheduler_with_wrong_task_count_is_rejected() -> None:
    experiment = TinyExperiment()
    data = experiment.load(0)
    config = TrainConfig(lr=0.01, batch_size=16)

    with pytest.raises(UsageError, match="the scheduler has 3 tasks"):
        Trainer(data, experiment.build_model(data.tasks), MTLScheduler(3), config)


def test_stl_scheduler_trains_only_its_task() -> None:
    torch.manual_seed(0)
    experiment = TinyExperiment()
    data = experiment.load(0)
    config = TrainConfig(n_epochs=3, lr=0.01, batch_size=16, device="cpu")
    trainer = Trainer(data, experiment.build_model(data.tasks), STLScheduler(2, 1), config)

    result = trainer.fit()

    assert [record.active.tolist() for record in result.records[1:]] == [[False, True]] * 2


def test_fit_runs_on_default_device(caplog: pytest.LogCaptureFixture) -> None:
    config = TrainConfig(n_epochs=3, bf16=True, pin_memory=True)

    with caplog.at_level(logging.INFO, logger="dst._trainer"):
        trainer, result = train_experiment(TinyExperiment(), "mtl", config)

    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert trainer.device.type == expected_device
    assert np.isfinite(result.records[-1].train_losses).all()
    assert result.records[-1].updated
    if expected_device == "cpu":
        assert "bf16 autocast applies on CUDA only" in caplog.text


def test_stl_best_epoch_ignores_untrained_tasks() -> None:
    records = [make_record(1, 40.0, 40.0), make_record(2, 50.0, 50.0)]
    # The trained task improves at epoch 2 while the untrained head gets much worse.
    records[1].val_errors = np.array([10.0, 90.0])

    result = TrainResult.from_records(records, trained=np.array([True, False]))

    assert result.best_epoch == 2
    assert TrainResult.from_records(records).best_epoch == 1


def test_stl_trainer_marks_only_its_task_trained() -> None:
    trainer = make_trainer("stl", n_epochs=2)

    assert trainer.trained_tasks.tolist() == [True, False]


def test_resume_with_other_scheduler_raises_usage_error(tmp_path: Path) -> None:
    make_trainer("dst", tmp_path=tmp_path, n_epochs=2).fit()
    other = make_trainer("mtl", tmp_path=tmp_path, n_epochs=3)

    with pytest.raises(UsageError, match="does not match this run"):
        other.resume(tmp_path / CHECKPOINT_NAME)


def test_resume_from_corrupt_file_raises_usage_error(tmp_path: Path) -> None:
    checkpoint = tmp_path / CHECKPOINT_NAME
    checkpoint.write_text("not a checkpoint")
    trainer = make_trainer(n_epochs=2)

    with pytest.raises(UsageError, match="cannot be read"):
        trainer.resume(checkpoint)
