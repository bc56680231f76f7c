"""Dropped Scheduled Task (DST) for multi-task learning, with Optuna studies and MLflow tracking.

DST gates each task's loss on or off once per epoch with a probability built from the
task's depth, its labelled count, how far its loss has fallen and whether it stagnates
(A. Malhotra, M. Vatsa, R. Singh, "Dropped Scheduled Task: Mitigating Negative Transfer in
Multi-task Learning using Dynamic Task Dropping", TMLR 2022).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The public names load on first use (PEP 562), so that the command line's --help and
# argument errors, and code that uses only the numpy scheduler, do not wait for torch.
_MODULE_OF = {
    "DivergedError": "dst._errors",
    "UsageError": "dst._errors",
    "Experiment": "dst._experiment",
    "ExperimentData": "dst._experiment",
    "Metric": "dst._experiment",
    "MultiTaskModel": "dst._experiment",
    "Task": "dst._experiment",
    "create_experiment": "dst._experiment",
    "resolve_experiment": "dst._experiment",
    "split_validation": "dst._experiment",
    "LAMBDA_NAMES": "dst._scheduler",
    "DSTScheduler": "dst._scheduler",
    "MTLScheduler": "dst._scheduler",
    "RandomScheduler": "dst._scheduler",
    "Scheduler": "dst._scheduler",
    "STLScheduler": "dst._scheduler",
    "make_scheduler": "dst._scheduler",
    "parse_lambdas": "dst._scheduler",
    "Callback": "dst._trainer",
    "EpochRecord": "dst._trainer",
    "TrainConfig": "dst._trainer",
    "Trainer": "dst._trainer",
    "TrainResult": "dst._trainer",
    "train_experiment": "dst._trainer",
}

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'dst' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULE_OF])


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
