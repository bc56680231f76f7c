"""Dropped Scheduled Task (DST) for multi-task learning, with Optuna studies and MLflow tracking.

DST gates each task's loss on or off once per epoch with a probability built from the
task's depth, its labelled count, how far its loss has fallen and whether it stagnates
(A. Malhotra, M. Vatsa, R. Singh, "Dropped Scheduled Task: Mitigating Negative Transfer in
Multi-task Learning using Dynamic Task Dropping", TMLR 2022).
"""

from dst._errors import DivergedError, UsageError
from dst._experiment import (
    Experiment,
    ExperimentData,
    Metric,
    MultiTaskModel,
    Task,
    create_experiment,
    resolve_experiment,
    split_validation,
)
from dst._scheduler import (
    LAMBDA_NAMES,
    DSTScheduler,
    MTLScheduler,
    RandomScheduler,
    Scheduler,
    STLScheduler,
    make_scheduler,
    parse_lambdas,
)
from dst._trainer import (
    Callback,
    EpochRecord,
    TrainConfig,
    Trainer,
    TrainResult,
    train_experiment,
)

__all__ = [
    "LAMBDA_NAMES",
    "Callback",
    "DSTScheduler",
    "DivergedError",
    "EpochRecord",
    "Experiment",
    "ExperimentData",
    "MTLScheduler",
    "Metric",
    "MultiTaskModel",
    "RandomScheduler",
    "STLScheduler",
    "Scheduler",
    "Task",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "UsageError",
    "create_experiment",
    "make_scheduler",
    "parse_lambdas",
    "resolve_experiment",
    "split_validation",
    "train_experiment",
]
