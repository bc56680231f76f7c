"""Study files: the TOML format, its validation and the resolved study config.

A study file is data, read with :mod:`tomllib`. Its tables:

- ``[study]``: ``name``, ``n_trials``, ``n_epochs`` and ``seeds``. The name defaults to the
  file name without ``.toml``. ``n_trials`` counts the trials of every worker together and
  defaults to the number of ``[[enqueue]]`` rows. Each seed trains its own MLflow run.
- ``[experiment]``: ``name`` (a built-in name or ``package.module:Name``) and the table
  ``[experiment.options]``. An experiment with a ``data_dir`` option takes it from the
  command line (``--data-dir``), never from the file, because the path is machine-local.
- ``[train]``: ``lr``, ``batch_size`` (default: the experiment's ``train_defaults``) and
  ``static_weights``.
- ``[scheduler]``: the defaults of every trial, ``name`` (``dst``, ``mtl``, ``random`` or
  ``stl``), ``lambdas``, ``beta``, ``count_metric`` and ``p``.
- ``[search]``: what sampled trials search. ``lambdas = true`` samples the five weights on
  the simplex; ``beta = [low, high]`` samples beta in that range. Without this table
  every sampled trial trains the ``[scheduler]`` defaults.
- ``[sampler]``: ``name`` (``tpe`` or ``random``), ``seed`` and ``n_startup_trials``.
- ``[pruner]``: ``name`` (``none`` or ``median``), ``n_startup_trials`` and
  ``n_warmup_steps``, on the validation average error of each epoch.
- ``[[enqueue]]``: fixed rows, each with a unique ``label`` and any of ``scheduler``,
  ``lambdas``, ``beta``, ``p`` and ``count_metric``; the rest comes from ``[scheduler]``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dst._errors import UsageError
from dst._scheduler import COUNT_METRICS, LAMBDA_NAMES, LAMBDA_SUM_TOLERANCE, SCHEDULER_NAMES

_logger = logging.getLogger(__name__)

DEFAULT_LAMBDAS = (0.2, 0.2, 0.2, 0.2, 0.2)
SAMPLER_NAMES = ("tpe", "random")
PRUNER_NAMES = ("none", "median")
DATA_DIR_OPTION = "data_dir"
"""Experiment option that names a machine-local data folder, given by ``--data-dir``."""

_TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "study": ("name", "n_trials", "n_epochs", "seeds"),
    "experiment": ("name", "options"),
    "train": ("lr", "batch_size", "static_weights"),
    "scheduler": ("name", "lambdas", "beta", "count_metric", "p"),
    "search": ("lambdas", "beta"),
    "sampler": ("name", "seed", "n_startup_trials"),
    "pruner": ("name", "n_startup_trials", "n_warmup_steps"),
    "enqueue": ("label", "scheduler", "lambdas", "beta", "p", "count_metric"),
}
_ROW_ONLY_FOR = {"lambdas": "dst", "beta": "dst", "count_metric": "dst", "p": "random"}


@dataclass(frozen=True)
class Row:
    """A fixed row of a study, enqueued once under its label, with every value resolved.

    ``lambdas``, ``beta`` and ``count_metric`` apply to the ``dst`` scheduler and ``p`` to
    ``random``; the others train without them.
    """

    label: str
    scheduler: str
    lambdas: tuple[float, ...]
    beta: float
    count_metric: str
    p: float

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "lambdas": list(self.lambdas)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Row:
        return cls(**{**values, "lambdas": tuple(values["lambdas"])})


@dataclass(frozen=True)
class StudyConfig:
    """A study file resolved with the command-line overrides; stored with the Optuna study.

    Attributes:
        name: Study name, also the MLflow experiment name.
        experiment: Built-in experiment name or ``package.module:Name``.
        options: Experiment options, ``data_dir`` included when one was given.
        n_trials: Trials of the whole study: complete, pruned and failed ones count.
        n_epochs: Epochs per run, counting epoch 1, the loss-estimation pass.
        seeds: Seeds of each trial; the trial's value is the mean over them.
        lr: Learning rate, or None for the experiment's default.
        batch_size: Batch size, or None for the experiment's default.
        static_weights: Whether task losses are scaled by ``w_t = mean(V1) / V1_t``.
        defaults: Scheduler settings of sampled trials, as a row labelled ``""``.
        search_lambdas: Whether sampled trials sample the lambdas on the simplex.
        search_beta: ``(low, high)`` range of beta for sampled trials, or None.
        sampler: ``tpe`` or ``random``.
        sampler_seed: Seed of the sampler, or None for an unseeded one.
        sampler_startup_trials: Random trials before TPE starts modelling.
        pruner: ``none`` or ``median``.
        pruner_startup_trials: Trials that finish before the median pruner prunes.
        pruner_warmup_steps: Steps before the median pruner prunes. Seed ``i`` reports
            epoch ``e`` as step ``i * n_epochs + e``, so the warmup covers the first
            epochs of the first seed only.
        rows: The ``[[enqueue]]`` rows, in file order.
    """

    name: str
    experiment: str
    options: dict[str, Any] = field(default_factory=dict)
    n_trials: int = 1
    n_epochs: int = 10
    seeds: tuple[int, ...] = (0,)
    lr: float | None = None
    batch_size: int | None = None
    static_weights: bool = True
    defaults: Row = Row("", "dst", DEFAULT_LAMBDAS, 0.1, "proportional", 0.5)
    search_lambdas: bool = False
    search_beta: tuple[float, float] | None = None
    sampler: str = "tpe"
    sampler_seed: int | None = 0
    sampler_startup_trials: int = 10
    pruner: str = "none"
    pruner_startup_trials: int = 5
    pruner_warmup_steps: int = 2
    rows: tuple[Row, ...] = ()

    @property
    def searches(self) -> bool:
        """Whether sampled trials differ from each other."""
        return self.search_lambdas or self.search_beta is not None

    def to_dict(self) -> dict[str, Any]:
        """Return the config as JSON-compatible builtins, the form stored in Optuna."""
        values = dataclasses.asdict(self)
        values["seeds"] = list(self.seeds)
        values["defaults"] = self.defaults.to_dict()
        values["rows"] = [row.to_dict() for row in self.rows]
        values["search_beta"] = list(self.search_beta) if self.search_beta else None
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> StudyConfig:
        """Rebuild a config written by :meth:`to_dict`."""
        values = dict(values)
        values["seeds"] = tuple(values["seeds"])
        values["defaults"] = Row.from_dict(values["defaults"])
        values["rows"] = tuple(Row.from_dict(row) for row in values["rows"])
        if values["search_beta"] is not None:
            values["search_beta"] = tuple(values["search_beta"])
        return cls(**values)


@dataclass(frozen=True)
class Overrides:
    """Command-line values that shorten or adapt a study without editing its file.

    ``seeds`` is either a count (the file's first seeds, continued with consecutive
    numbers when the file lists fewer) or an explicit list.
    """

    n_epochs: int | None = None
    n_trials: int | None = None
    seeds: int | tuple[int, ...] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None


def load_study_file(path: Path, overrides: Overrides | None = None) -> StudyConfig:
    """Read, validate and resolve the study file at ``path``.

    Raises:
        UsageError: The file is missing or not TOML, or a key is unknown, has the wrong
            type or an invalid value. The message names the key with its table.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(
            f"study file {str(path)!r} not found; check the path, such as studies/quickstart.toml"
        ) from None
    except OSError as error:
        raise UsageError(
            f"cannot read study file {str(path)!r}: {error.strerror}; give a readable TOML file"
        ) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"invalid TOML in study file {str(path)!r}: {error}") from None
    return parse_study(document, default_name=path.stem, overrides=overrides or Overrides())


def parse_study(
    document: Mapping[str, Any], *, default_name: str, overrides: Overrides
) -> StudyConfig:
    """Validate a parsed study file and apply ``overrides``; see the module docstring."""
    _check_tables(document)
    study = _table(document, "study")
    experiment = _table(document, "experiment")
    if "name" not in experiment:
        raise UsageError(
            "missing key [experiment].name; name a built-in experiment or module:Name"
        )
    options = _parse_options(experiment)
    defaults = _parse_defaults(_table(document, "scheduler"))
    rows = _parse_rows(document.get("enqueue", []), defaults)
    search_lambdas, search_beta = _parse_search(_table(document, "search"), defaults)
    config = StudyConfig(
        name=_string(study.get("name", default_name), "[study].name"),
        experiment=_string(experiment["name"], "[experiment].name"),
        options={**options, **overrides.options},
        n_trials=_integer(study.get("n_trials", len(rows) or None), "[study].n_trials", 1),
        n_epochs=_integer(study.get("n_epochs", 10), "[study].n_epochs", 2),
        seeds=_parse_seeds(study.get("seeds", [0]), "[study].seeds"),
        **_parse_train(_table(document, "train")),
        defaults=defaults,
        search_lambdas=search_lambdas,
        search_beta=search_beta,
        **_parse_sampler(_table(document, "sampler")),
        **_parse_pruner(_table(document, "pruner")),
        rows=rows,
    )
    return apply_overrides(config, overrides)


def apply_overrides(config: StudyConfig, overrides: Overrides) -> StudyConfig:
    """Return ``config`` with the command-line values of ``overrides`` applied."""
    changes: dict[str, Any] = {}
    if overrides.n_epochs is not None:
        changes["n_epochs"] = _integer(overrides.n_epochs, "--n-epochs", 2)
    if overrides.n_trials is not None:
        changes["n_trials"] = _integer(overrides.n_trials, "--n-trials", 1)
    if overrides.seeds is not None:
        changes["seeds"] = _override_seeds(config.seeds, overrides.seeds)
    options = {**config.options, **overrides.options}
    if overrides.data_dir is not None:
        options[DATA_DIR_OPTION] = overrides.data_dir
    changes["options"] = options
    return dataclasses.replace(config, **changes)


def parse_seeds_argument(text: str) -> int | tuple[int, ...]:
    """Parse ``--seeds``: a count such as ``3`` or a comma-separated list such as ``0,4,7``."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        values = [int(part) for part in parts]
    except ValueError:
        values = []
    if not values or (len(values) == 1 and "," not in text and values[0] < 1):
        raise UsageError(
            f"invalid --seeds {text!r}; give a count such as 3 or a list such as 0,4,7"
        )
    if len(values) == 1 and "," not in text:
        return values[0]
    return _parse_seeds(values, "--seeds")


def _override_seeds(seeds: tuple[int, ...], value: int | tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(value, tuple):
        return value
    extended = list(seeds[:value])
    next_seed = max(seeds) + 1
    while len(extended) < value:
        extended.append(next_seed)
        next_seed += 1
    return tuple(extended)


def _check_tables(document: Mapping[str, Any]) -> None:
    for name, value in document.items():
        if name not in _TABLE_KEYS:
            raise UsageError(
                f"unknown table [{name}] in the study file; valid tables: "
                + ", ".join(f"[{table}]" for table in _TABLE_KEYS)
            )
        if name == "enqueue":
            if not isinstance(value, list):
                raise UsageError("[enqueue] must be an array of tables; write [[enqueue]] rows")
            for index, row in enumerate(value, start=1):
                _check_keys(row, f"[[enqueue]] row {index}", _TABLE_KEYS["enqueue"])
        else:
            _check_keys(value, f"[{name}]", _TABLE_KEYS[name])


def _check_keys(table: Any, where: str, valid: Sequence[str]) -> None:
    if not isinstance(table, dict):
        raise UsageError(f"{where} must be a table, got {table!r}; write it as {where} with keys")
    for key in table:
        if key not in valid:
            raise UsageError(
                f"unknown key {where}.{key} in the study file; valid keys: {', '.join(valid)}"
            )


def _table(document: Mapping[str, Any], name: str) -> dict[str, Any]:
    return dict(document.get(name, {}))


def _parse_options(experiment: Mapping[str, Any]) -> dict[str, Any]:
    options = experiment.get("options", {})
    if not isinstance(options, dict):
        raise UsageError(
            f"[experiment].options must be a table, got {options!r}; write [experiment.options]"
        )
    if DATA_DIR_OPTION in options:
        raise UsageError(
            f"[experiment.options].{DATA_DIR_OPTION} is machine-local and not allowed in a"
            " study file; remove it and pass --data-dir to dst study create and dst worker"
        )
    return dict(options)


def _parse_train(train: Mapping[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if "lr" in train:
        values["lr"] = _number(train["lr"], "[train].lr", 0.0, math.inf, low_open=True)
    if "batch_size" in train:
        values["batch_size"] = _integer(train["batch_size"], "[train].batch_size", 1)
    if "static_weights" in train:
        values["static_weights"] = _boolean(train["static_weights"], "[train].static_weights")
    return values


def _parse_defaults(table: Mapping[str, Any]) -> Row:
    base = Row("", "dst", DEFAULT_LAMBDAS, 0.1, "proportional", 0.5)
    return _resolve_row(table, base, "[scheduler]", label="", check_applicable=False)


def _parse_rows(rows: Sequence[Mapping[str, Any]], defaults: Row) -> tuple[Row, ...]:
    parsed: list[Row] = []
    labels: set[str] = set()
    for index, table in enumerate(rows, start=1):
        where = f"[[enqueue]] row {index}"
        if "label" not in table:
            raise UsageError(f"missing key {where}.label; give every row a unique label")
        label = _string(table["label"], f"{where}.label")
        if label in labels:
            raise UsageError(f"duplicate label {label!r} at {where}.label; make labels unique")
        labels.add(label)
        parsed.append(_resolve_row(table, defaults, where, label=label, check_applicable=True))
    return tuple(parsed)


def _resolve_row(
    table: Mapping[str, Any], base: Row, where: str, *, label: str, check_applicable: bool
) -> Row:
    scheduler_key = "name" if where == "[scheduler]" else "scheduler"
    scheduler = base.scheduler
    if scheduler_key in table:
        scheduler = _choice(table[scheduler_key], f"{where}.{scheduler_key}", SCHEDULER_NAMES)
    if check_applicable:
        for key, needed in _ROW_ONLY_FOR.items():
            if key in table and scheduler != needed:
                raise UsageError(
                    f"{where}.{key} applies only to scheduler {needed!r}, but the row's"
                    f" scheduler is {scheduler!r}; remove the key or set scheduler = {needed!r}"
                )
    lambdas = base.lambdas
    if "lambdas" in table:
        lambdas = _lambdas(table["lambdas"], f"{where}.lambdas")
    beta = base.beta
    if "beta" in table:
        beta = _number(table["beta"], f"{where}.beta", 0.0, 1.0)
    count_metric = base.count_metric
    if "count_metric" in table:
        count_metric = _choice(table["count_metric"], f"{where}.count_metric", COUNT_METRICS)
    p = base.p
    if "p" in table:
        p = _number(table["p"], f"{where}.p", 0.0, 1.0, low_open=True)
    return Row(label, scheduler, lambdas, beta, count_metric, p)


def _parse_search(search: Mapping[str, Any], defaults: Row) -> tuple[bool, Any]:
    search_lambdas = _boolean(search.get("lambdas", False), "[search].lambdas")
    beta = search.get("beta")
    search_beta: tuple[float, float] | None = None
    if isinstance(beta, list):
        search_beta = _beta_range(beta)
    elif beta is not None:
        raise UsageError(
            f"[search].beta must be a [low, high] range, got {beta!r}; write beta = [0.0, 0.5],"
            " or set a fixed beta for every trial as [scheduler].beta"
        )
    if (search_lambdas or search_beta) and defaults.scheduler != "dst":
        raise UsageError(
            f"[search] samples DST settings but [scheduler].name is {defaults.scheduler!r};"
            ' set [scheduler].name = "dst" or remove [search]'
        )
    return search_lambdas, search_beta


def _beta_range(beta: list[Any]) -> tuple[float, float]:
    if len(beta) != 2 or not all(_is_number(value) for value in beta):
        raise UsageError(
            f"[search].beta must be [low, high] with two numbers, got {beta!r};"
            " write beta = [0.0, 0.5]"
        )
    low = _number(beta[0], "[search].beta low", 0.0, 1.0)
    high = _number(beta[1], "[search].beta high", 0.0, 1.0)
    if low >= high:
        raise UsageError(
            f"[search].beta range must have low < high, got {beta!r}; write beta = [0.0, 0.5]"
        )
    return low, high


def _parse_sampler(sampler: Mapping[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if "name" in sampler:
        values["sampler"] = _choice(sampler["name"], "[sampler].name", SAMPLER_NAMES)
    if "seed" in sampler:
        values["sampler_seed"] = _integer(sampler["seed"], "[sampler].seed", 0)
    if "n_startup_trials" in sampler:
        values["sampler_startup_trials"] = _integer(
            sampler["n_startup_trials"], "[sampler].n_startup_trials", 0
        )
    return values


def _parse_pruner(pruner: Mapping[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if "name" in pruner:
        values["pruner"] = _choice(pruner["name"], "[pruner].name", PRUNER_NAMES)
    if "n_startup_trials" in pruner:
        values["pruner_startup_trials"] = _integer(
            pruner["n_startup_trials"], "[pruner].n_startup_trials", 0
        )
    if "n_warmup_steps" in pruner:
        values["pruner_warmup_steps"] = _integer(
            pruner["n_warmup_steps"], "[pruner].n_warmup_steps", 0
        )
    return values


def _parse_seeds(value: Any, key: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise UsageError(
            f"{key} must be a non-empty list of integers, got {value!r}; e.g. [0, 1, 2]"
        )
    seeds = tuple(_integer(seed, key, 0) for seed in value)
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"{key} lists a seed twice, got {list(seeds)}; give distinct seeds")
    return seeds


def _lambdas(value: Any, key: str) -> tuple[float, ...]:
    names = ", ".join(LAMBDA_NAMES)
    if not isinstance(value, list) or len(value) != 5 or not all(map(_is_number, value)):
        raise UsageError(
            f"{key} must be a list of five numbers ({names}), got {value!r};"
            " e.g. [0.2, 0.2, 0.2, 0.2, 0.2]"
        )
    lambdas = tuple(float(item) for item in value)
    if any(not math.isfinite(item) or item < 0 for item in lambdas):
        raise UsageError(f"{key} must be non-negative, got {list(lambdas)}; use weights >= 0")
    total = math.fsum(lambdas)
    if abs(total - 1.0) > LAMBDA_SUM_TOLERANCE:
        raise UsageError(f"{key} must sum to 1, got {total:.6g} ({list(lambdas)}); rescale them")
    return lambdas


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{key} must be a non-empty string, got {value!r}; quote it in TOML")
    return value


def _boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"{key} must be true or false, got {value!r}")
    return value


def _integer(value: Any, key: str, minimum: int) -> int:
    if value is None:
        raise UsageError(f"missing {key}; set it to an integer >= {minimum}")
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UsageError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _number(value: Any, key: str, low: float, high: float, *, low_open: bool = False) -> float:
    low_bracket = "(" if low_open else "["
    interval = f"{low_bracket}{low:g}, {high:g}]"
    if not _is_number(value):
        raise UsageError(f"{key} must be a number in {interval}, got {value!r}")
    number = float(value)
    too_low = number <= low if low_open else number < low
    if not math.isfinite(number) or too_low or number > high:
        raise UsageError(f"{key} must be in {interval}, got {value!r}")
    return number


def _choice(value: Any, key: str, choices: Sequence[str]) -> str:
    if value not in choices:
        listed = ", ".join(repr(choice) for choice in choices)
        raise UsageError(f"{key} must be one of {listed}, got {value!r}")
    return str(value)
