"""Tests of the DST scheduler and its baselines against hand-computed trajectories."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dst import (
    LAMBDA_NAMES,
    DSTScheduler,
    MTLScheduler,
    RandomScheduler,
    Scheduler,
    STLScheduler,
    Task,
    UsageError,
    make_scheduler,
    parse_lambdas,
)
from dst._metrics import Accuracy

# Three tasks used by the hand-computed trajectory:
#   depths (2, 4, 4)       -> P_d = (0.5, 1, 1)
#   counts (50, 100, 25)   -> P_c = (0.5, 1, 0.25), inverse (0.5, 0.25, 1)
DEPTHS = (2, 4, 4)
COUNTS = (50, 100, 25)
NAMES = ("rises", "stagnates", "vanishes")

# Task "rises" has a loss that rises, "stagnates" stops improving after epoch 2, and
# "vanishes" falls to exactly zero at epoch 4 and stays there.
LOSSES = (
    (1.0, 2.0, 4.0),
    (1.5, 1.0, 2.0),
    (1.8, 1.0, 1.0),
    (1.8, 1.0, 0.0),
    (1.8, 1.0, 0.0),
)


def _trajectory_scheduler(**kwargs: Any) -> DSTScheduler:
    return DSTScheduler(DEPTHS, COUNTS, seed=3, task_names=NAMES, **kwargs)


def _probability(*terms: float) -> float:
    """Return P for the default lambdas, 0.2 each, from P_d, P_c, P_u, P_r (P_b = 1)."""
    return 0.2 * (sum(terms) + 1.0)


def _assert_close(actual: np.ndarray | None, expected: Sequence[float]) -> None:
    assert actual is not None
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12)


def _is_builtin(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_builtin(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_is_builtin(item) for item in value)
    return value is None or type(value) in (bool, int, float, str)


def _tasks() -> list[Task]:
    loss = functools.partial(torch.nn.functional.cross_entropy, reduction="none")
    return [
        Task(name, "classification", loss, Accuracy, depth, count)
        for name, depth, count in zip(NAMES, DEPTHS, COUNTS, strict=True)
    ]


# Hand-computed trajectory


def test_first_epoch_gives_full_dynamic_terms() -> None:
    scheduler = _trajectory_scheduler()
    scheduler.step(LOSSES[0])

    components = scheduler.components
    _assert_close(components["depth"], [0.5, 1.0, 1.0])
    _assert_close(components["count"], [0.5, 1.0, 0.25])
    _assert_close(components["incompleteness"], [1.0, 1.0, 1.0])
    _assert_close(components["stagnancy"], [1.0, 1.0, 1.0])
    _assert_close(components["regularizer"], [1.0, 1.0, 1.0])
    # 0.2 * (0.5 + 0.5 + 1 + 1 + 1) = 0.8, 0.2 * 5 = 1, 0.2 * (1 + 0.25 + 3) = 0.85
    _assert_close(scheduler.probabilities, [0.8, 1.0, 0.85])
    assert scheduler.rate_of_fall is None


def test_second_epoch_takes_absolute_rate_of_fall() -> None:
    scheduler = _trajectory_scheduler()
    for losses in LOSSES[:2]:
        scheduler.step(losses)

    # I = V2 / V1 = (1.5, 0.5, 0.5), mean I = 2.5 / 3 = 5/6
    # P_u = min(1, I / mean I) = (min(1, 1.8), 0.6, 0.6) = (1, 0.6, 0.6)
    _assert_close(scheduler.components["incompleteness"], [1.0, 0.6, 0.6])
    # R = (V1 - V2) / V1 / P_u = (-0.5 / 1 / 1, 1 / 2 / 0.6, 2 / 4 / 0.6) = (-0.5, 5/6, 5/6)
    # R' = |R| at epoch 2 = (0.5, 5/6, 5/6)
    _assert_close(scheduler.rate_of_fall, [0.5, 5 / 6, 5 / 6])
    # mean R' = (1/2 + 5/3) / 3 = 13/18
    # P_r = min(1, mean R' / R') = (min(1, 13/9), 13/15, 13/15)
    _assert_close(scheduler.components["stagnancy"], [1.0, 13 / 15, 13 / 15])
    expected = [
        _probability(0.5, 0.5, 1.0, 1.0),
        _probability(1.0, 1.0, 0.6, 13 / 15),
        _probability(1.0, 0.25, 0.6, 13 / 15),
    ]
    _assert_close(scheduler.probabilities, expected)
    # 0.2 * (0.5 + 0.5 + 1 + 1 + 1) = 0.8, 0.2 * (1 + 1 + 0.6 + 13/15 + 1) = 0.2 * 67/15
    assert expected[0] == pytest.approx(0.8)
    assert expected[1] == pytest.approx(67 / 75)


def test_rate_held_unless_loss_falls() -> None:
    scheduler = _trajectory_scheduler()
    for losses in LOSSES[:3]:
        scheduler.step(losses)

    # I = V3 / V1 = (1.8, 0.5, 0.25), mean I = 2.55 / 3 = 0.85
    # P_u = (min(1, 1.8 / 0.85), 0.5 / 0.85, 0.25 / 0.85) = (1, 10/17, 5/17)
    _assert_close(scheduler.components["incompleteness"], [1.0, 10 / 17, 5 / 17])
    # R = ((1.5 - 1.8) / 1.5 / 1, 0 / 1, (2 - 1) / 2 / (5/17)) = (-0.2, 0, 1.7)
    # "rises" and "stagnates" have R <= 0, so R' is held at 0.5 and 5/6.
    # "vanishes": R' = 0.1 * 1.7 + 0.9 * 5/6 = 0.17 + 0.75 = 0.92 = 23/25
    _assert_close(scheduler.rate_of_fall, [0.5, 5 / 6, 0.92])
    # mean R' = (1/2 + 5/6 + 23/25) / 3 = (338/150) / 3 = 169/225
    # P_r = (min(1, 338/225), (169/225) / (5/6), (169/225) / (23/25)) = (1, 1014/1125, 169/207)
    _assert_close(scheduler.components["stagnancy"], [1.0, 1014 / 1125, 169 / 207])
    expected = [
        _probability(0.5, 0.5, 1.0, 1.0),
        _probability(1.0, 1.0, 10 / 17, 1014 / 1125),
        _probability(1.0, 0.25, 5 / 17, 169 / 207),
    ]
    _assert_close(scheduler.probabilities, expected)


def test_task_reaching_zero_loss_gets_zero_incompleteness() -> None:
    scheduler = _trajectory_scheduler()
    for losses in LOSSES[:4]:
        scheduler.step(losses)

    # I = (1.8, 0.5, 0), mean I = 2.3 / 3
    # P_u = (min(1, 1.8 / (2.3 / 3)), 1.5 / 2.3, 0) = (1, 15/23, 0)
    _assert_close(scheduler.components["incompleteness"], [1.0, 15 / 23, 0.0])
    # "vanishes": R = (1 - 0) / 1 / max(0, 1e-12) = 1e12, so
    # R' = 0.1 * 1e12 + 0.9 * 0.92 = 1e11 + 0.828. The other two hold R'.
    r_vanishes = 1e11 + 0.828
    _assert_close(scheduler.rate_of_fall, [0.5, 5 / 6, r_vanishes])
    # mean R' = (0.5 + 5/6 + 1e11 + 0.828) / 3, far above 0.5 and 5/6
    mean_rate = (0.5 + 5 / 6 + r_vanishes) / 3
    _assert_close(scheduler.components["stagnancy"], [1.0, 1.0, mean_rate / r_vanishes])
    assert scheduler.components["stagnancy"][2] == pytest.approx(1 / 3)
    expected = [
        _probability(0.5, 0.5, 1.0, 1.0),
        _probability(1.0, 1.0, 15 / 23, 1.0),
        _probability(1.0, 0.25, 0.0, mean_rate / r_vanishes),
    ]
    _assert_close(scheduler.probabilities, expected)


def test_loss_staying_at_zero_holds_rate() -> None:
    scheduler = _trajectory_scheduler()
    for losses in LOSSES:
        scheduler.step(losses)

    # V(4) = V(5) = 0 for "vanishes": R = 0, so R' keeps 1e11 + 0.828.
    _assert_close(scheduler.rate_of_fall, [0.5, 5 / 6, 1e11 + 0.828])
    _assert_close(scheduler.components["incompleteness"], [1.0, 15 / 23, 0.0])
    assert scheduler.n_steps == 5


def test_inverse_count_uses_smallest_count_over_count() -> None:
    scheduler = _trajectory_scheduler(count_metric="inverse")
    scheduler.step(LOSSES[0])

    # min c / c = (25/50, 25/100, 25/25)
    _assert_close(scheduler.components["count"], [0.5, 0.25, 1.0])
    # 0.2 * (0.5 + 0.5 + 3), 0.2 * (1 + 0.25 + 3), 0.2 * (1 + 1 + 3)
    _assert_close(scheduler.probabilities, [0.8, 0.85, 1.0])


def test_mapping_lambdas_match_tuple_lambdas() -> None:
    weights = (0.1, 0.1, 0.4, 0.4, 0.0)
    by_tuple = _trajectory_scheduler(lambdas=weights)
    by_mapping = _trajectory_scheduler(lambdas=dict(zip(LAMBDA_NAMES, weights, strict=True)))
    for losses in LOSSES[:3]:
        by_tuple.step(losses)
        by_mapping.step(losses)

    assert by_mapping.lambdas == weights
    _assert_close(by_mapping.probabilities, by_tuple.probabilities.tolist())
    # Third epoch: 0.1 * P_d + 0.1 * P_c + 0.4 * P_u + 0.4 * P_r, terms as computed above
    expected_stagnant = 0.1 * 1.0 + 0.1 * 1.0 + 0.4 * 10 / 17 + 0.4 * 1014 / 1125
    assert by_mapping.probabilities[1] == pytest.approx(expected_stagnant, rel=1e-12)


# Degenerate losses


def test_unchanged_loss_gets_full_stagnancy() -> None:
    scheduler = DSTScheduler((1, 1), (1, 1))
    scheduler.step((1.0, 2.0))
    scheduler.step((1.0, 1.0))

    # I = (1, 0.5), mean I = 0.75, P_u = (1, 2/3)
    # R = (0 / 1 / 1, 1 / 2 / (2/3)) = (0, 0.75), R' = |R| = (0, 0.75), mean R' = 0.375
    # R' = 0 gives P_r = 1 for the first task, and the second gets 0.375 / 0.75 = 0.5.
    _assert_close(scheduler.rate_of_fall, [0.0, 0.75])
    _assert_close(scheduler.components["stagnancy"], [1.0, 0.5])


def test_all_zero_losses_give_neutral_terms() -> None:
    scheduler = DSTScheduler((1, 2), (3, 3))
    for _ in range(3):
        scheduler.step((0.0, 0.0))

    # mean I = 0 and mean R' = 0, so P_u = P_r = 1 for both tasks.
    _assert_close(scheduler.components["incompleteness"], [1.0, 1.0])
    _assert_close(scheduler.components["stagnancy"], [1.0, 1.0])
    _assert_close(scheduler.rate_of_fall, [0.0, 0.0])
    # 0.2 * (0.5 + 1 + 3), 0.2 * (1 + 1 + 3)
    _assert_close(scheduler.probabilities, [0.9, 1.0])


def test_loss_rising_from_zero_start_stays_finite() -> None:
    scheduler = DSTScheduler((1, 1), (1, 1))
    scheduler.step((0.0, 1.0))
    scheduler.step((2.0, 1.0))

    # I = (1e12, 1) because a rise from zero is capped at 1e12, mean I = (1e12 + 1) / 2
    # P_u = (1, 2 / (1e12 + 1))
    incompleteness = scheduler.components["incompleteness"]
    assert incompleteness[0] == 1.0
    assert incompleteness[1] == pytest.approx(2 / (1e12 + 1), rel=1e-12)
    # R = (-1e12, 0) is a rise from zero, so R' = |R| = (1e12, 0) and P_r = (0.5, 1)
    _assert_close(scheduler.rate_of_fall, [1e12, 0.0])
    _assert_close(scheduler.components["stagnancy"], [0.5, 1.0])
    assert np.all(np.isfinite(scheduler.probabilities))


def test_single_task_is_always_on() -> None:
    scheduler = DSTScheduler((5,), (7,), seed=11)
    for losses in ((3.0,), (2.0,), (2.5,), (1.0,)):
        gates = scheduler.step(losses)
        # P_d = P_c = P_u = P_r = P_b = 1 for one task with a positive loss.
        _assert_close(scheduler.probabilities, [1.0])
        assert gates.tolist() == [True]


def test_probabilities_clipped_when_lambdas_sum_slightly_above_one() -> None:
    scheduler = DSTScheduler((1, 1), (1, 1), lambdas=(0.2, 0.2, 0.2, 0.2, 0.2 + 5e-7))
    scheduler.step((1.0, 1.0))

    assert scheduler.probabilities.max() == 1.0


_LOSS = st.floats(min_value=0.0, max_value=1e308, allow_nan=False, allow_infinity=False)
_SMALL_LOSS = st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=10.0))


@st.composite
def _loss_sequences(draw: st.DrawFn, values: st.SearchStrategy[float]) -> list[list[float]]:
    n_tasks = draw(st.integers(min_value=1, max_value=5))
    n_epochs = draw(st.integers(min_value=1, max_value=8))
    row = st.lists(values, min_size=n_tasks, max_size=n_tasks)
    return draw(st.lists(row, min_size=n_epochs, max_size=n_epochs))


def _assert_valid_after_each_step(sequence: list[list[float]], beta: float) -> None:
    n_tasks = len(sequence[0])
    scheduler = DSTScheduler(range(1, n_tasks + 1), [3] * n_tasks, beta=beta)
    for losses in sequence:
        gates = scheduler.step(losses)
        probabilities = scheduler.probabilities
        assert gates.dtype == np.bool_
        assert np.all(np.isfinite(probabilities)), (losses, probabilities)
        assert np.all((probabilities >= 0) & (probabilities <= 1)), (losses, probabilities)
        for name, values in scheduler.components.items():
            assert np.all((values >= 0) & (values <= 1)), (name, losses, values)
        rate_of_fall = scheduler.rate_of_fall
        if rate_of_fall is not None:
            assert np.all(np.isfinite(rate_of_fall)), (losses, rate_of_fall)


@settings(max_examples=300, deadline=None)
@given(sequence=_loss_sequences(_LOSS), beta=st.floats(min_value=0.0, max_value=1.0))
def test_probabilities_finite_for_any_float_losses(
    sequence: list[list[float]], beta: float
) -> None:
    _assert_valid_after_each_step(sequence, beta)


@settings(max_examples=300, deadline=None)
@given(sequence=_loss_sequences(_SMALL_LOSS), beta=st.sampled_from([0.0, 0.1, 1.0]))
def test_probabilities_finite_for_losses_with_zeros(
    sequence: list[list[float]], beta: float
) -> None:
    _assert_valid_after_each_step(sequence, beta)


# Gates


def test_gate_frequencies_follow_probabilities() -> None:
    # lambdas (0.5, 0.5, 0, 0, 0): P = 0.5 * (P_d + P_c) = (0.125, 0.1875, 1) for every epoch.
    scheduler = DSTScheduler((1, 2, 8), (1, 1, 8), lambdas=(0.5, 0.5, 0, 0, 0), seed=5)
    n_steps = 20000
    n_on = np.zeros(3)
    for _ in range(n_steps):
        n_on += scheduler.step((1.0, 1.0, 1.0))

    expected = np.array([0.125, 0.1875, 1.0])
    _assert_close(scheduler.probabilities, expected.tolist())
    tolerance = 5 * np.sqrt(expected * (1 - expected) / n_steps)
    frequencies = n_on / n_steps
    assert np.all(np.abs(frequencies - expected) <= tolerance), frequencies
    assert frequencies[2] == 1.0


def test_gates_are_one_uniform_draw_per_step() -> None:
    scheduler = _trajectory_scheduler()
    rng = np.random.default_rng(3)
    for losses in LOSSES:
        gates = scheduler.step(losses)
        expected = rng.random(3) < scheduler.probabilities
        assert gates.tolist() == expected.tolist()


def test_same_seed_gives_same_gates() -> None:
    first = _trajectory_scheduler()
    second = _trajectory_scheduler()
    other_seed = DSTScheduler(DEPTHS, COUNTS, seed=4)
    first_gates, second_gates, other_gates = [], [], []
    for _ in range(10):
        for losses in LOSSES:
            first_gates.append(first.step(losses).tolist())
            second_gates.append(second.step(losses).tolist())
            other_gates.append(other_seed.step(losses).tolist())

    assert first_gates == second_gates
    assert first_gates != other_gates


# State dict


def _run(scheduler: Scheduler, steps: Sequence[Sequence[float]]) -> list[tuple[Any, ...]]:
    records = []
    for losses in steps:
        gates = scheduler.step(losses)
        components = {name: values.tolist() for name, values in scheduler.components.items()}
        records.append((gates.tolist(), scheduler.probabilities.tolist(), components))
    return records


@pytest.mark.parametrize("n_before", [0, 1, 2, 4])
def test_state_dict_resumes_exactly(n_before: int) -> None:
    steps = list(LOSSES) + [(1.7, 0.9, 0.5), (1.6, 0.95, 0.2), (1.0, 0.7, 0.2)]
    original = _trajectory_scheduler()
    _run(original, steps[:n_before])
    state = original.state_dict()

    restored = _trajectory_scheduler()
    restored.load_state_dict(state)

    assert restored.n_steps == n_before
    assert _run(restored, steps[n_before:]) == _run(original, steps[n_before:])


def test_state_dict_contains_only_builtins() -> None:
    scheduler = _trajectory_scheduler()
    _run(scheduler, LOSSES[:3])
    for state in (
        scheduler.state_dict(),
        RandomScheduler(3, 0.5).state_dict(),
        STLScheduler(3, 1).state_dict(),
    ):
        assert _is_builtin(state), state


def test_state_dict_survives_torch_weights_only_load(tmp_path: Path) -> None:
    original = _trajectory_scheduler()
    _run(original, LOSSES[:3])
    path = tmp_path / "checkpoint.pt"
    torch.save({"scheduler": original.state_dict()}, path)

    restored = _trajectory_scheduler()
    restored.load_state_dict(torch.load(path, weights_only=True)["scheduler"])

    assert _run(restored, LOSSES[3:]) == _run(original, LOSSES[3:])


def test_random_scheduler_resumes_exactly() -> None:
    original = RandomScheduler(4, 0.3, seed=9)
    _run(original, [(1.0,) * 4] * 3)
    restored = RandomScheduler(4, 0.3, seed=0)
    restored.load_state_dict(original.state_dict())

    assert _run(restored, [(1.0,) * 4] * 20) == _run(original, [(1.0,) * 4] * 20)


def test_load_state_dict_rejects_other_scheduler() -> None:
    state = RandomScheduler(3, 0.5).state_dict()
    with pytest.raises(ValueError, match="state of scheduler 'RandomScheduler' cannot be"):
        _trajectory_scheduler().load_state_dict(state)


def test_load_state_dict_rejects_other_task_count() -> None:
    state = MTLScheduler(2).state_dict()
    with pytest.raises(ValueError, match="state is for 2 tasks but this scheduler has 3"):
        MTLScheduler(3).load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 0.5}, "state has beta 0.1 but this scheduler has 0.5"),
        ({"lambdas": (0.5, 0.5, 0, 0, 0)}, "state has lambdas [0.2, 0.2, 0.2, 0.2, 0.2]"),
        ({"count_metric": "inverse"}, "state has count_metric 'proportional'"),
    ],
)
def test_load_state_dict_rejects_other_settings(kwargs: dict[str, Any], message: str) -> None:
    state = _trajectory_scheduler().state_dict()
    with pytest.raises(ValueError) as raised:
        _trajectory_scheduler(**kwargs).load_state_dict(state)
    assert message in str(raised.value)


def test_load_state_dict_rejects_other_depths() -> None:
    state = _trajectory_scheduler().state_dict()
    with pytest.raises(ValueError, match=r"state has depth \[0.5, 1.0, 1.0\]"):
        DSTScheduler((4, 4, 4), COUNTS).load_state_dict(state)


# Baselines


def test_mtl_keeps_every_task_on() -> None:
    scheduler = MTLScheduler(3)
    for losses in LOSSES:
        gates = scheduler.step(losses)
        assert gates.tolist() == [True, True, True]
        _assert_close(scheduler.probabilities, [1.0, 1.0, 1.0])
    assert scheduler.components == {}
    assert scheduler.n_steps == len(LOSSES)


def test_random_scheduler_draws_fixed_probability() -> None:
    scheduler = RandomScheduler(3, 0.75, seed=2)
    rng = np.random.default_rng(2)
    n_on = np.zeros(3)
    n_steps = 20000
    for _ in range(n_steps):
        gates = scheduler.step((1.0, 1.0, 1.0))
        assert gates.tolist() == (rng.random(3) < 0.75).tolist()
        n_on += gates

    _assert_close(scheduler.probabilities, [0.75, 0.75, 0.75])
    assert scheduler.components == {}
    tolerance = 5 * math.sqrt(0.75 * 0.25 / n_steps)
    assert np.all(np.abs(n_on / n_steps - 0.75) <= tolerance)


def test_random_scheduler_with_zero_probability_never_draws_on() -> None:
    scheduler = RandomScheduler(2, 0.0)
    assert not any(scheduler.step((1.0, 1.0)).any() for _ in range(100))


def test_stl_keeps_only_its_task_on() -> None:
    scheduler = STLScheduler(3, 1)
    for losses in LOSSES:
        assert scheduler.step(losses).tolist() == [False, True, False]
    _assert_close(scheduler.probabilities, [0.0, 1.0, 0.0])
    assert scheduler.components == {}


def test_baselines_check_losses() -> None:
    for scheduler in (MTLScheduler(2), RandomScheduler(2, 0.5), STLScheduler(2, 0)):
        with pytest.raises(ValueError, match="loss of task 1 at epoch 1 is nan"):
            scheduler.step((1.0, math.nan))


# Invalid losses


def test_wrong_number_of_losses_raises() -> None:
    scheduler = _trajectory_scheduler()
    with pytest.raises(ValueError, match=r"expected 3 losses, one per task, at epoch 1"):
        scheduler.step((1.0, 2.0))
    with pytest.raises(ValueError, match=r"got an array of shape \(3, 1\)"):
        scheduler.step([[1.0], [2.0], [3.0]])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -0.5])
def test_invalid_loss_names_task_and_epoch(bad: float) -> None:
    scheduler = _trajectory_scheduler()
    scheduler.step(LOSSES[0])
    scheduler.step(LOSSES[1])
    with pytest.raises(ValueError) as raised:
        scheduler.step((1.0, bad, 1.0))

    message = str(raised.value)
    assert "task 1 ('stagnates')" in message
    assert "at epoch 3" in message
    assert str(bad) in message
    assert not isinstance(raised.value, UsageError)
    # The failed step leaves the state unchanged.
    assert scheduler.n_steps == 2


def test_invalid_loss_without_names_uses_index() -> None:
    scheduler = DSTScheduler((1, 1), (1, 1))
    with pytest.raises(ValueError, match=r"^loss of task 0 at epoch 1 is -1.0;"):
        scheduler.step((-1.0, 1.0))


# Invalid arguments


@pytest.mark.parametrize(
    ("lambdas", "message"),
    [
        (
            (0.2, 0.2, 0.2, 0.2, 0.1),
            "lambdas must sum to 1, got 0.9 (0.2, 0.2, 0.2, 0.2, 0.1); rescale them",
        ),
        ((0.25, 0.25, 0.25, 0.25), "expected 5 lambdas"),
        ((0.5, 0.5, 0.5, -0.5, 0.0), "lambda 'stagnancy' must be a finite non-negative"),
        ((math.nan, 0.2, 0.2, 0.2, 0.4), "lambda 'depth' must be a finite non-negative"),
        ({"depth": 1.0, "counts": 0.0}, "unknown key 'counts'"),
        ({"depth": 1.0}, "missing key 'count'"),
        ("0.2,0.2,0.2,0.2,0.2", "use parse_lambdas"),
        ((0.2, "x", 0.2, 0.2, 0.4), "lambdas must be numbers"),
    ],
)
def test_invalid_lambdas_raise_usage_error(lambdas: Any, message: str) -> None:
    with pytest.raises(UsageError) as raised:
        DSTScheduler(DEPTHS, COUNTS, lambdas=lambdas)
    assert message in str(raised.value)
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": -0.1}, "beta must be a number in [0, 1], got -0.1"),
        ({"beta": 1.5}, "beta must be a number in [0, 1], got 1.5"),
        ({"beta": math.nan}, "beta must be a number in [0, 1], got nan"),
        ({"count_metric": "log"}, "unknown count_metric 'log'; use one of proportional"),
        ({"depths": (1, 2)}, "depths has 2 values but label_counts has 3"),
        ({"depths": (1, 0, 2)}, "depths[1] must be a positive number, got 0"),
        ({"label_counts": (1, 2, -3)}, "label_counts[2] must be a positive number, got -3"),
        ({"depths": (), "label_counts": ()}, "depths must be a non-empty list"),
        ({"task_names": ("a", "b")}, "task_names has 2 names but there are 3 tasks"),
        ({"seed": -1}, "seed must be a non-negative integer, got -1"),
    ],
)
def test_invalid_arguments_raise_usage_error(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"depths": DEPTHS, "label_counts": COUNTS, **kwargs}
    with pytest.raises(UsageError) as raised:
        DSTScheduler(**arguments)
    assert message in str(raised.value)


def test_invalid_count_names_task() -> None:
    with pytest.raises(UsageError, match=r"label_counts\[1\] \('stagnates'\) must be"):
        DSTScheduler(DEPTHS, (1, 0, 1), task_names=NAMES)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: RandomScheduler(2, 1.5), "probability p must be in [0, 1], got 1.5"),
        (lambda: STLScheduler(2, 2), "STL task index 2 is out of range"),
        (lambda: MTLScheduler(0), "n_tasks must be a positive integer, got 0"),
    ],
)
def test_invalid_baseline_arguments_raise_usage_error(build: Any, message: str) -> None:
    with pytest.raises(UsageError) as raised:
        build()
    assert message in str(raised.value)


# parse_lambdas


def test_parse_lambdas_reads_command_line_form() -> None:
    assert parse_lambdas("0.2,0.2,0.2,0.2,0.2") == (0.2, 0.2, 0.2, 0.2, 0.2)
    assert parse_lambdas(" 0, .25 ,0.25,0.25,0.25") == (0.0, 0.25, 0.25, 0.25, 0.25)
    assert LAMBDA_NAMES == ("depth", "count", "incompleteness", "stagnancy", "regularizer")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.2;0.2;0.2;0.2;0.2", "invalid lambdas '0.2;0.2;0.2;0.2;0.2'"),
        ("a,b,c,d,e", "expected five comma-separated numbers"),
        ("", "invalid lambdas ''"),
        ("0.5,0.5", "expected 5 lambdas"),
        ("0.2,0.2,0.2,0.2,0.3", "lambdas must sum to 1, got 1.1"),
    ],
)
def test_parse_lambdas_rejects_malformed_text(text: str, message: str) -> None:
    with pytest.raises(UsageError) as raised:
        parse_lambdas(text)
    assert message in str(raised.value)


# make_scheduler


def test_make_scheduler_builds_dst_from_tasks() -> None:
    scheduler = make_scheduler(
        "dst", _tasks(), lambdas=(0.1, 0.1, 0.4, 0.4, 0.0), beta=0.5, seed=3
    )
    direct = DSTScheduler(DEPTHS, COUNTS, lambdas=(0.1, 0.1, 0.4, 0.4, 0.0), beta=0.5, seed=3)

    assert isinstance(scheduler, DSTScheduler)
    assert scheduler.task_names == NAMES
    assert scheduler.beta == 0.5
    assert _run(scheduler, LOSSES) == _run(direct, LOSSES)


def test_make_scheduler_passes_count_metric() -> None:
    scheduler = make_scheduler("dst", _tasks(), count_metric="inverse")
    scheduler.step(LOSSES[0])
    _assert_close(scheduler.components["count"], [0.5, 0.25, 1.0])


def test_make_scheduler_builds_baselines() -> None:
    assert isinstance(make_scheduler("mtl", _tasks()), MTLScheduler)
    random = make_scheduler("random", _tasks(), p=0.75, seed=1)
    assert isinstance(random, RandomScheduler)
    _assert_close(random.probabilities, [0.75, 0.75, 0.75])
    by_name = make_scheduler("stl", _tasks(), stl_task="vanishes")
    by_index = make_scheduler("stl", _tasks(), stl_task=2)
    assert isinstance(by_name, STLScheduler)
    assert by_name.task == 2
    assert isinstance(by_index, STLScheduler)
    assert by_index.task == 2


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("gradnorm", {}, "unknown scheduler 'gradnorm'; use one of dst, mtl, random, stl"),
        ("stl", {}, "scheduler 'stl' needs stl_task"),
        ("stl", {"stl_task": "pose"}, "unknown STL task 'pose'; use one of 'rises'"),
        ("stl", {"stl_task": 3}, "STL task index 3 is out of range"),
        ("random", {"p": -0.1}, "probability p must be in [0, 1], got -0.1"),
        ("dst", {"lambdas": (1, 1, 0, 0, 0)}, "lambdas must sum to 1, got 2"),
    ],
)
def test_make_scheduler_rejects_invalid_input(
    name: str, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(UsageError) as raised:
        make_scheduler(name, _tasks(), **kwargs)
    assert message in str(raised.value)


def test_make_scheduler_names_task_with_zero_labels() -> None:
    tasks = _tasks()
    tasks[0] = Task("empty", "classification", tasks[0].loss, Accuracy, 2, 0)
    with pytest.raises(UsageError, match=r"label_counts\[0\] \('empty'\) must be a positive"):
        make_scheduler("dst", tasks)
