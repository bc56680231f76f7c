"""Study files: validation messages, resolution of rows and overrides, and the shipped files."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dst import UsageError
from dst._study import check_experiment
from dst._study_file import (
    Overrides,
    StudyConfig,
    load_study_file,
    parse_seeds_argument,
    parse_study,
)

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "studies"

TABLE9_LAMBDAS = [
    (0.0, 0.25, 0.25, 0.25, 0.25),
    (0.25, 0.0, 0.25, 0.25, 0.25),
    (0.25, 0.25, 0.0, 0.25, 0.25),
    (0.25, 0.25, 0.25, 0.0, 0.25),
    (0.25, 0.25, 0.25, 0.25, 0.0),
    (1.0, 0.0, 0.0, 0.0, 0.0),
    (0.0, 1.0, 0.0, 0.0, 0.0),
    (0.0, 0.0, 1.0, 0.0, 0.0),
    (0.0, 0.0, 0.0, 1.0, 0.0),
    (0.2, 0.2, 0.3, 0.3, 0.0),
    (0.1, 0.1, 0.4, 0.4, 0.0),
    (0.4, 0.4, 0.1, 0.1, 0.0),
    (0.15, 0.15, 0.3, 0.3, 0.1),
    (0.3, 0.3, 0.15, 0.15, 0.1),
    (0.2, 0.2, 0.2, 0.2, 0.2),
]

VALID: dict[str, Any] = {
    "study": {"n_trials": 4, "n_epochs": 3, "seeds": [0, 1]},
    "experiment": {"name": "shapes", "options": {"n_samples": 96}},
    "scheduler": {"name": "dst", "beta": 0.2},
    "search": {"lambdas": True, "beta": [0.0, 0.5]},
    "sampler": {"name": "tpe", "seed": 3},
    "pruner": {"name": "median", "n_warmup_steps": 1},
    "enqueue": [
        {"label": "mtl", "scheduler": "mtl"},
        {"label": "leave out depth", "lambdas": [0.0, 0.25, 0.25, 0.25, 0.25]},
    ],
}


def parse(document: dict[str, Any], overrides: Overrides | None = None) -> StudyConfig:
    return parse_study(document, default_name="from-file", overrides=overrides or Overrides())


def changed(path: str, value: Any) -> dict[str, Any]:
    """Return a copy of VALID with ``path`` (``table.key``, ``enqueue.1.key``) set or deleted."""
    document = copy.deepcopy(VALID)
    *parents, key = path.split(".")
    target: Any = document
    for part in parents:
        target = target[int(part)] if part.isdigit() else target.setdefault(part, {})
    if value is DELETE:
        del target[int(key) if key.isdigit() else key]
    else:
        target[int(key) if key.isdigit() else key] = value
    return document


DELETE = object()

BAD_FILES = [
    ("unknown table", changed("searchh", {"beta": 0.1}), "unknown table [searchh]"),
    ("unknown key", changed("search.betaa", 0.1), "unknown key [search].betaa"),
    ("unknown row key", changed("enqueue.0.lambda", 1), "unknown key [[enqueue]] row 1.lambda"),
    ("beta type", changed("search.beta", "high"), "[search].beta must be a [low, high] range"),
    ("fixed beta in search", changed("search.beta", 0.3), "set a fixed beta for every trial"),
    ("beta range order", changed("search.beta", [0.5, 0.1]), "[search].beta range must have"),
    ("beta range bounds", changed("search.beta", [0.0, 2.0]), "[search].beta high must be in"),
    ("scheduler beta", changed("scheduler.beta", 1.5), "[scheduler].beta must be in [0, 1]"),
    ("scheduler name", changed("scheduler.name", "gradnorm"), "[scheduler].name must be one of"),
    (
        "lambdas sum",
        changed("scheduler.lambdas", [0.2] * 4 + [0.1]),
        "[scheduler].lambdas must sum",
    ),
    ("lambdas count", changed("scheduler.lambdas", [0.5, 0.5]), "list of five numbers"),
    ("lambdas sign", changed("enqueue.1.lambdas", [-0.2, 0.3, 0.3, 0.3, 0.3]), "non-negative"),
    ("n_trials type", changed("study.n_trials", "4"), "[study].n_trials must be an integer"),
    ("n_trials zero", changed("study.n_trials", 0), "[study].n_trials must be an integer >= 1"),
    ("n_epochs one", changed("study.n_epochs", 1), "[study].n_epochs must be an integer >= 2"),
    ("n_epochs bool", changed("study.n_epochs", True), "[study].n_epochs must be an integer"),
    ("seeds empty", changed("study.seeds", []), "[study].seeds must be a non-empty list"),
    ("seeds repeated", changed("study.seeds", [1, 1]), "[study].seeds lists a seed twice"),
    ("experiment name", changed("experiment.name", DELETE), "missing key [experiment].name"),
    ("options type", changed("experiment.options", 3), "[experiment].options must be a table"),
    ("data_dir", changed("experiment.options.data_dir", "/data"), "pass --data-dir"),
    ("lr", changed("train.lr", 0.0), "[train].lr must be in (0, inf]"),
    ("batch size", changed("train.batch_size", 0.5), "[train].batch_size must be an integer"),
    ("static weights", changed("train.static_weights", "yes"), "must be true or false"),
    ("sampler", changed("sampler.name", "cmaes"), "[sampler].name must be one of"),
    ("pruner", changed("pruner.name", "hyperband"), "[pruner].name must be one of"),
    ("warmup", changed("pruner.n_warmup_steps", -1), "[pruner].n_warmup_steps must be"),
    ("label missing", changed("enqueue.0.label", DELETE), "missing key [[enqueue]] row 1.label"),
    ("label repeated", changed("enqueue.1.label", "mtl"), "duplicate label 'mtl'"),
    ("row p", changed("enqueue.0.p", 0.5), "[[enqueue]] row 1.p applies only to scheduler"),
    (
        "row p range",
        changed("enqueue.0", {"label": "r", "scheduler": "random", "p": 0}),
        ".p must",
    ),
    ("row lambdas", changed("enqueue.0.lambdas", [0.2] * 5), "row 1.lambdas applies only"),
    ("search not dst", {**VALID, "scheduler": {"name": "mtl"}, "enqueue": []}, "[search] samples"),
    ("enqueue table", changed("enqueue", {"label": "x"}), "write [[enqueue]] rows"),
]


@pytest.mark.parametrize(
    ("document", "message"),
    [case[1:] for case in BAD_FILES],
    ids=[case[0] for case in BAD_FILES],
)
def test_invalid_study_file_names_key(document, message):
    with pytest.raises(UsageError) as raised:
        parse(document)
    text = str(raised.value)
    assert message in text
    assert "\n" not in text


def test_valid_study_file_resolves_rows():
    config = parse(VALID)
    assert config.name == "from-file"
    assert config.seeds == (0, 1)
    assert config.search_lambdas
    assert config.search_beta == (0.0, 0.5)
    assert config.sampler_seed == 3
    assert config.pruner == "median"
    mtl, leave_out = config.rows
    assert (mtl.label, mtl.scheduler) == ("mtl", "mtl")
    assert leave_out.scheduler == "dst"
    assert leave_out.lambdas == (0.0, 0.25, 0.25, 0.25, 0.25)
    assert leave_out.beta == 0.2  # from [scheduler]
    assert leave_out.count_metric == "proportional"


def test_config_round_trips_through_dict():
    config = parse(VALID)
    assert StudyConfig.from_dict(config.to_dict()) == config


def test_n_trials_defaults_to_row_count():
    document = changed("study.n_trials", DELETE)
    assert parse(document).n_trials == 2
    without_rows = changed("enqueue", [])
    without_rows["study"].pop("n_trials")
    with pytest.raises(UsageError, match="missing \\[study\\].n_trials"):
        parse(without_rows)


def test_overrides_replace_file_values():
    overrides = Overrides(
        n_epochs=2, n_trials=7, seeds=3, options={"image_size": 16}, data_dir="/data/x"
    )
    config = parse(VALID, overrides)
    assert config.n_epochs == 2
    assert config.n_trials == 7
    assert config.seeds == (0, 1, 2)  # the file's two seeds, continued
    assert config.options == {"n_samples": 96, "image_size": 16, "data_dir": "/data/x"}


def test_seed_count_override_takes_first_seeds():
    assert parse(VALID, Overrides(seeds=1)).seeds == (0,)
    assert parse(VALID, Overrides(seeds=(4, 7))).seeds == (4, 7)


def test_invalid_overrides_name_option():
    with pytest.raises(UsageError, match="--n-epochs must be an integer >= 2"):
        parse(VALID, Overrides(n_epochs=1))
    with pytest.raises(UsageError, match="--n-trials must be an integer >= 1"):
        parse(VALID, Overrides(n_trials=0))


@pytest.mark.parametrize(
    ("text", "expected"), [("3", 3), ("0,4,7", (0, 4, 7)), ("5,", (5,)), (" 2 ", 2)]
)
def test_seeds_argument_is_count_or_list(text, expected):
    assert parse_seeds_argument(text) == expected


@pytest.mark.parametrize("text", ["0", "x", "1,1", "", "-2"])
def test_invalid_seeds_argument_raises(text):
    with pytest.raises(UsageError):
        parse_seeds_argument(text)


def test_invalid_toml_names_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[study\nname = 1\n")
    with pytest.raises(UsageError, match="invalid TOML in study file"):
        load_study_file(path)
    with pytest.raises(UsageError, match="study file .*missing.toml' not found; check the path"):
        load_study_file(tmp_path / "missing.toml")
    with pytest.raises(UsageError, match="cannot read study file .*; give a readable TOML file"):
        load_study_file(tmp_path)


def test_unknown_experiment_option_raises():
    config = parse(changed("experiment.options.n_sample", 10))
    with pytest.raises(UsageError, match="unknown option 'n_sample'"):
        check_experiment(config)


@pytest.mark.parametrize("path", sorted(STUDIES.glob("*.toml")), ids=lambda path: path.name)
def test_shipped_study_file_is_valid(path):
    config = load_study_file(path, Overrides(data_dir=str(REPO)))
    assert config.name == path.stem
    assert config.n_trials >= len(config.rows)


@pytest.mark.parametrize("name", ["table9-omniglot", "table9-shapes"])
def test_table9_files_hold_table9_rows(name):
    config = load_study_file(STUDIES / f"{name}.toml")
    assert len(config.rows) == 19
    assert config.seeds == (0, 1, 2)
    assert config.n_trials == 19
    by_scheduler: dict[str, list] = {}
    for row in config.rows:
        by_scheduler.setdefault(row.scheduler, []).append(row)
    assert [row.lambdas for row in by_scheduler["dst"]] == TABLE9_LAMBDAS
    assert all(row.count_metric == "proportional" for row in by_scheduler["dst"])
    assert [row.p for row in by_scheduler["random"]] == [0.5, 0.75]
    assert len(by_scheduler["mtl"]) == 1
    assert len(by_scheduler["stl"]) == 1


def test_omniglot_study_files_hold_no_path():
    for name in ("table9-omniglot", "search-omniglot"):
        config = load_study_file(STUDIES / f"{name}.toml")
        assert "data_dir" not in config.options


def test_cli_prints_one_line_for_invalid_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[experiment]\nname = "shapes"\n[search]\nbetaa = 0.1\n')
    result = subprocess.run(
        [sys.executable, "-m", "dst", "study", "create", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "unknown key [search].betaa" in result.stderr
    assert list(tmp_path.iterdir()) == [path]
