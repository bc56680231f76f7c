"""Names shared by the tracking and the report: MLflow keys, tags and run types."""

from __future__ import annotations

import re
from collections.abc import Sequence

_INVALID_KEY_CHARACTERS = re.compile(r"[^A-Za-z0-9_\-. /]")
MAX_KEY_LENGTH = 200

TAG_RUN_TYPE = "dst.run_type"
"""Tag on every run: ``study``, ``trial``, ``seed`` or ``stl_task``."""
TAG_ROW_LABEL = "dst.row_label"
TAG_TASKS = "dst.tasks"
"""JSON list of ``[task name, key]`` pairs, so the report shows the original names."""
TAG_STL_TASK = "dst.stl_task"
TAG_STUDY_NAME = "optuna.study_name"
TAG_TRIAL_NUMBER = "optuna.trial_number"


def task_keys(names: Sequence[str]) -> list[str]:
    """Return one valid, distinct MLflow key part per task name.

    MLflow accepts letters, digits, ``_ - . /`` and spaces in a key. Other characters become
    ``_``; a slash becomes ``_`` too, so that ``train_loss/<key>`` keeps one level. Names
    that collide after this get ``-2``, ``-3`` and so on, in task order.
    """
    keys: list[str] = []
    seen: set[str] = set()
    for name in names:
        key = _INVALID_KEY_CHARACTERS.sub("_", name).replace("/", "_").strip() or "task"
        key = key[:MAX_KEY_LENGTH]
        candidate, suffix = key, 2
        while candidate in seen:
            candidate = f"{key}-{suffix}"
            suffix += 1
        seen.add(candidate)
        keys.append(candidate)
    return keys
