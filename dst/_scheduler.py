"""Task schedulers: the DST gate distribution and the MTL, random-drop and STL baselines.

A scheduler receives the K mean training losses of the epoch that just ended and returns K
gates, one per task, that switch the tasks on or off for the next epoch. Every scheduler
keeps its whole state in :meth:`Scheduler.state_dict`, so a run resumes with the same gates.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from dst._errors import UsageError

if TYPE_CHECKING:
    from dst._experiment import Task

_logger = logging.getLogger(__name__)

LAMBDA_NAMES = ("depth", "count", "incompleteness", "stagnancy", "regularizer")
"""Names of the five DST weights, in the order of the ``lambdas`` tuple."""

COUNT_METRICS = ("proportional", "inverse")
"""Forms of the count term: ``c_t / max c`` or the inverse ablation ``min c / c_t``."""

SCHEDULER_NAMES = ("dst", "mtl", "random", "stl")
"""Names that :func:`make_scheduler` accepts."""

DEFAULT_LAMBDAS = (0.2, 0.2, 0.2, 0.2, 0.2)
LAMBDA_SUM_TOLERANCE = 1e-6

P_U_FLOOR = 1e-12
"""Lower bound of P_u in the denominator of the rate of fall, so that R stays finite."""

RATIO_CAP = 1.0 / P_U_FLOOR
"""Upper bound of |R| and of the incompleteness ratio I, so that their means stay finite."""

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]


class Scheduler(ABC):
    """Base of every scheduler: loss checks, the step count and the state dict.

    Attributes:
        n_tasks: Number of tasks K.
        task_names: Names used in error messages, or None to name tasks by index only.
    """

    def __init__(self, n_tasks: int, task_names: Sequence[str] | None = None) -> None:
        if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1:
            raise UsageError(f"n_tasks must be a positive integer, got {n_tasks!r}")
        if task_names is not None and len(task_names) != n_tasks:
            raise UsageError(
                f"task_names has {len(task_names)} names but there are {n_tasks} tasks;"
                " give one name per task"
            )
        self.n_tasks = n_tasks
        self.task_names = tuple(task_names) if task_names is not None else None
        self._n_steps = 0
        self._probabilities: FloatArray = self._initial_probabilities()

    @property
    def n_steps(self) -> int:
        """Number of calls to :meth:`step` so far, that is the epoch k of the last step."""
        return self._n_steps

    @property
    def probabilities(self) -> FloatArray:
        """P(k, t) of the last step, shape ``(n_tasks,)``.

        Before the first step, the probabilities for the loss-estimation epoch.
        """
        return self._probabilities.copy()

    @property
    def components(self) -> dict[str, FloatArray]:
        """Per-task terms of the probability by name, empty for schedulers without terms."""
        return {}

    def step(self, losses: ArrayLike) -> BoolArray:
        """Draw the gates for the next epoch from the losses of the epoch that just ended.

        Args:
            losses: The K mean training losses V(k, t), one per task in task order.

        Returns:
            A bool array of shape ``(n_tasks,)``, true for the tasks to train next epoch.

        Raises:
            ValueError: The number of losses is not ``n_tasks``, or a loss is negative,
                NaN or infinite. The scheduler's state is unchanged then.
        """
        epoch = self._n_steps + 1
        values = self._checked_losses(losses, epoch)
        gates = self._step(values)
        self._n_steps = epoch
        _logger.debug(
            "epoch %d: probabilities %s, gates %s", epoch, self._probabilities.tolist(), gates
        )
        return gates

    def state_dict(self) -> dict[str, Any]:
        """Return the scheduler's state as Python builtins only (no numpy arrays)."""
        return {
            "scheduler": type(self).__name__,
            "n_tasks": self.n_tasks,
            "settings": self._settings(),
            "n_steps": self._n_steps,
            "probabilities": self._probabilities.tolist(),
            **self._extra_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state returned by :meth:`state_dict` of the same kind of scheduler.

        Raises:
            ValueError: The state belongs to another scheduler class, number of tasks or
                settings (such as the lambdas), so the run would not resume exactly.
        """
        kind = state.get("scheduler")
        if kind != type(self).__name__:
            raise ValueError(
                f"state of scheduler {kind!r} cannot be loaded into {type(self).__name__};"
                " build the scheduler that wrote the checkpoint"
            )
        if state.get("n_tasks") != self.n_tasks:
            raise ValueError(
                f"state is for {state.get('n_tasks')!r} tasks but this scheduler has"
                f" {self.n_tasks}; build it with the tasks of the checkpoint"
            )
        settings = self._settings()
        for name, value in state["settings"].items():
            if settings.get(name) != value:
                raise ValueError(
                    f"state has {name} {value!r} but this scheduler has"
                    f" {settings.get(name)!r}; build it with the settings of the checkpoint"
                )
        self._n_steps = int(state["n_steps"])
        self._probabilities = np.asarray(state["probabilities"], dtype=np.float64)
        self._load_extra_state(state)

    def _initial_probabilities(self) -> FloatArray:
        return np.ones(self.n_tasks)

    @abstractmethod
    def _step(self, losses: FloatArray) -> BoolArray:
        """Update the state from checked losses, set ``_probabilities``, return the gates."""

    def _settings(self) -> dict[str, Any]:
        """Return the arguments, as builtins, that must match for a state to load."""
        return {}

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        del state

    def _task_label(self, task: int) -> str:
        if self.task_names is None:
            return f"task {task}"
        return f"task {task} ({self.task_names[task]!r})"

    def _checked_losses(self, losses: ArrayLike, epoch: int) -> FloatArray:
        values = np.asarray(losses, dtype=np.float64)
        if values.shape != (self.n_tasks,):
            raise ValueError(
                f"expected {self.n_tasks} losses, one per task, at epoch {epoch};"
                f" got an array of shape {values.shape}"
            )
        for task, value in enumerate(values.tolist()):
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"loss of {self._task_label(task)} at epoch {epoch} is {value};"
                    " expected a finite, non-negative mean training loss"
                )
        return values


class DSTScheduler(Scheduler):
    """Dropped Scheduled Task (DST): gates drawn from depth, count, progress and stagnancy.

    From A. Malhotra, M. Vatsa, R. Singh, "Dropped Scheduled Task: Mitigating Negative
    Transfer in Multi-task Learning using Dynamic Task Dropping", TMLR 2022. At the end of
    epoch k, task t is kept on for epoch k + 1 with probability::

        P(k,t) = l_d * P_d(t) + l_c * P_c(t) + l_u * P_u(k,t) + l_r * P_r(k,t) + l_b * P_b
        G(k,t) ~ Bernoulli(P(k,t)), independently per task

    where:

    - ``P_d(t) = d_t / max_j d_j`` is the depth term, d_t the layers from input to output t;
    - ``P_c(t) = c_t / max_j c_j`` is the count term, c_t task t's labelled training samples
      (``count_metric="inverse"``: ``min_j c_j / c_t``, the paper's inverse-count ablation);
    - ``P_u(k,t) = min(1, I(k,t) / mean_j I(k,j))`` is the incompleteness term, with
      ``I(k,t) = V(k,t) / V(1,t)`` and V(k,t) task t's mean training loss of epoch k;
    - ``P_r(k,t) = min(1, mean_j R'(k,j) / R'(k,t))`` is the stagnancy term, with the rate of
      fall ``R(k,t) = (V(k-1,t) - V(k,t)) / V(k-1,t) / P_u(k,t)``, ``R'(2,t) = |R(2,t)|``
      and, for k >= 3, ``R'(k,t) = beta * R(k,t) + (1 - beta) * R'(k-1,t)`` when
      ``R(k,t) > 0``, ``R'(k,t) = R'(k-1,t)`` when the loss did not fall;
    - ``P_b = 1`` is the regulariser term;
    - ``(l_d, l_c, l_u, l_r, l_b)`` are ``lambdas``, non-negative with sum 1;
    - at k = 1, ``P_u = P_r = 1``.

    The paper's Eq. 5 prints ``V(k) - V(k-1)`` in the numerator of R, which makes every
    falling loss negative and freezes R'. This class follows the authors' driver script,
    which uses ``V(k-1) - V(k)`` and the absolute value at k = 2.

    Degenerate losses follow these rules, so P is always finite and in [0, 1]:

    - I(k,t) is 0 when V(k,t) = 0, even when V(1,t) = 0. Otherwise I(k,t) is capped at
      ``RATIO_CAP`` (1e12), which is also its value when V(1,t) = 0 < V(k,t).
    - P_u is 1 for every task when mean I = 0 (every loss is zero).
    - R divides by ``max(P_u, P_U_FLOOR)`` (1e-12), so a task whose loss reaches zero
      (P_u = 0) gets a large finite R. R is clipped to [-RATIO_CAP, RATIO_CAP].
    - When V(k-1,t) = 0, R is 0 if V(k,t) = 0 (no change), and -RATIO_CAP otherwise (a
      rise from zero, the largest rise there is).
    - P_r is 1 for a task with R' = 0, such as one whose loss has not changed since
      epoch 1, and for every task when mean R' = 0.
    - P is clipped to [0, 1], because the lambdas may sum to 1 only within 1e-6.

    Before the first step, ``probabilities`` is 1 for every task (the loss-estimation
    epoch runs every head) and ``components`` is empty.

    Args:
        depths: Depth d_t of each task, positive.
        label_counts: Labelled training-sample count c_t of each task, positive.
        lambdas: Weights (l_d, l_c, l_u, l_r, l_b), or a mapping with the keys of
            :data:`LAMBDA_NAMES`.
        beta: Discount of the R' moving average, in [0, 1].
        seed: Seed of ``numpy.random.default_rng``. Each step draws ``rng.random(K)`` once,
            so a seed gives the same gate sequence for the same losses.
        count_metric: ``"proportional"`` or ``"inverse"``.
        task_names: Names used in error messages.

    Raises:
        UsageError: An argument is invalid; the message names the value and the fix.
    """

    def __init__(
        self,
        depths: Sequence[float],
        label_counts: Sequence[float],
        lambdas: Sequence[float] | Mapping[str, float] = DEFAULT_LAMBDAS,
        beta: float = 0.1,
        seed: int = 0,
        count_metric: str = "proportional",
        *,
        task_names: Sequence[str] | None = None,
    ) -> None:
        depth_values = _positive_values("depths", depths, task_names)
        count_values = _positive_values("label_counts", label_counts, task_names)
        if len(depth_values) != len(count_values):
            raise UsageError(
                f"depths has {len(depth_values)} values but label_counts has"
                f" {len(count_values)}; give one depth and one count per task"
            )
        if count_metric not in COUNT_METRICS:
            raise UsageError(
                f"unknown count_metric {count_metric!r}; use one of {', '.join(COUNT_METRICS)}"
            )
        self.lambdas = check_lambdas(lambdas)
        self.beta = _checked_beta(beta)
        self.count_metric = count_metric
        self.seed = _checked_seed(seed)
        self._rng = np.random.default_rng(seed)
        self._p_d = depth_values / depth_values.max()
        if count_metric == "proportional":
            self._p_c = count_values / count_values.max()
        else:
            self._p_c = count_values.min() / count_values
        self._v_first: FloatArray | None = None
        self._v_previous: FloatArray | None = None
        self._r_ema: FloatArray | None = None
        self._components: dict[str, FloatArray] = {}
        super().__init__(len(depth_values), task_names)

    @property
    def components(self) -> dict[str, FloatArray]:
        """P_d, P_c, P_u, P_r and P_b of the last step, keyed by :data:`LAMBDA_NAMES`."""
        return {name: values.copy() for name, values in self._components.items()}

    @property
    def rate_of_fall(self) -> FloatArray | None:
        """R'(k, t) of the last step, or None before the second step."""
        return None if self._r_ema is None else self._r_ema.copy()

    def _step(self, losses: FloatArray) -> BoolArray:
        if self._v_first is None:
            self._v_first = losses.copy()
            p_u = np.ones(self.n_tasks)
            p_r = np.ones(self.n_tasks)
        else:
            assert self._v_previous is not None
            p_u = _incompleteness(losses, self._v_first)
            rate = _rate_of_fall(self._v_previous, losses, p_u)
            self._r_ema = self._updated_r_ema(rate)
            p_r = _stagnancy(self._r_ema)
        self._v_previous = losses.copy()
        terms = (self._p_d, self._p_c, p_u, p_r, np.ones(self.n_tasks))
        self._components = dict(zip(LAMBDA_NAMES, (t.copy() for t in terms), strict=True))
        weighted = sum(weight * term for weight, term in zip(self.lambdas, terms, strict=True))
        self._probabilities = np.clip(np.asarray(weighted, dtype=np.float64), 0.0, 1.0)
        return self._rng.random(self.n_tasks) < self._probabilities

    def _updated_r_ema(self, rate: FloatArray) -> FloatArray:
        if self._r_ema is None:
            return np.abs(rate)
        moving_average = self.beta * rate + (1.0 - self.beta) * self._r_ema
        return np.where(rate > 0, moving_average, self._r_ema)

    def _settings(self) -> dict[str, Any]:
        return {
            "lambdas": list(self.lambdas),
            "beta": self.beta,
            "count_metric": self.count_metric,
            "depth": self._p_d.tolist(),
            "count": self._p_c.tolist(),
        }

    def _extra_state(self) -> dict[str, Any]:
        return {
            "rng": _builtin_rng_state(self._rng),
            "v_first": _to_list(self._v_first),
            "v_previous": _to_list(self._v_previous),
            "r_ema": _to_list(self._r_ema),
            "components": {name: values.tolist() for name, values in self._components.items()},
        }

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._rng.bit_generator.state = state["rng"]
        self._v_first = _to_array(state["v_first"])
        self._v_previous = _to_array(state["v_previous"])
        self._r_ema = _to_array(state["r_ema"])
        self._components = {
            name: np.asarray(values, dtype=np.float64)
            for name, values in state["components"].items()
        }


class MTLScheduler(Scheduler):
    """Traditional multi-task learning: every task is on at every epoch, P = 1."""

    def __init__(self, n_tasks: int, *, task_names: Sequence[str] | None = None) -> None:
        super().__init__(n_tasks, task_names)

    def _step(self, losses: FloatArray) -> BoolArray:
        return np.ones(self.n_tasks, dtype=np.bool_)


class RandomScheduler(Scheduler):
    """Random task dropping: each task is on with the fixed probability ``p``.

    Each step draws ``numpy.random.default_rng(seed).random(n_tasks)`` once, as DST does.
    """

    def __init__(
        self, n_tasks: int, p: float, seed: int = 0, *, task_names: Sequence[str] | None = None
    ) -> None:
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
            raise UsageError(f"random-drop probability p must be in [0, 1], got {p!r}")
        self.p = float(p)
        self.seed = _checked_seed(seed)
        self._rng = np.random.default_rng(seed)
        super().__init__(n_tasks, task_names)

    def _initial_probabilities(self) -> FloatArray:
        return np.full(self.n_tasks, self.p)

    def _step(self, losses: FloatArray) -> BoolArray:
        return self._rng.random(self.n_tasks) < self._probabilities

    def _settings(self) -> dict[str, Any]:
        return {"p": self.p}

    def _extra_state(self) -> dict[str, Any]:
        return {"rng": _builtin_rng_state(self._rng)}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._rng.bit_generator.state = state["rng"]


class STLScheduler(Scheduler):
    """Single-task learning: only task ``task`` is on, at every epoch."""

    def __init__(
        self, n_tasks: int, task: int, *, task_names: Sequence[str] | None = None
    ) -> None:
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < n_tasks:
            raise UsageError(
                f"STL task index {task!r} is out of range; use an index from 0 to {n_tasks - 1}"
            )
        self.task = task
        super().__init__(n_tasks, task_names)

    def _initial_probabilities(self) -> FloatArray:
        probabilities = np.zeros(self.n_tasks)
        probabilities[self.task] = 1.0
        return probabilities

    def _step(self, losses: FloatArray) -> BoolArray:
        return self._probabilities == 1.0

    def _settings(self) -> dict[str, Any]:
        return {"task": self.task}


def check_lambdas(lambdas: Sequence[float] | Mapping[str, float]) -> tuple[float, ...]:
    """Return the five DST weights as a tuple of floats after checking them.

    Args:
        lambdas: Five numbers in the order of :data:`LAMBDA_NAMES`, or a mapping with
            exactly those keys.

    Raises:
        UsageError: The weights are not five, a key is unknown or missing, a weight is
            negative or not finite, or the sum differs from 1 by more than 1e-6.
    """
    values = _lambda_values(lambdas)
    lambdas_text = "(" + ", ".join(f"{value:g}" for value in values) + ")"
    for name, value in zip(LAMBDA_NAMES, values, strict=True):
        if not math.isfinite(value) or value < 0:
            raise UsageError(
                f"lambda {name!r} must be a finite non-negative number, got {value:g} in"
                f" {lambdas_text}; use weights >= 0 that sum to 1"
            )
    total = math.fsum(values)
    if abs(total - 1.0) > LAMBDA_SUM_TOLERANCE:
        raise UsageError(f"lambdas must sum to 1, got {total:.6g} {lambdas_text}; rescale them")
    return values


def parse_lambdas(text: str) -> tuple[float, ...]:
    """Parse the command-line form ``"0.2,0.2,0.2,0.2,0.2"`` into checked DST weights.

    Raises:
        UsageError: The text is not five comma-separated numbers, or the weights are
            invalid (see :func:`check_lambdas`).
    """
    parts = [part.strip() for part in text.split(",")]
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        raise UsageError(
            f"invalid lambdas {text!r}; expected five comma-separated numbers for"
            f" {', '.join(LAMBDA_NAMES)}, such as 0.2,0.2,0.2,0.2,0.2"
        ) from None
    return check_lambdas(values)


def make_scheduler(
    name: str,
    tasks: Sequence[Task],
    *,
    lambdas: Sequence[float] | Mapping[str, float] = DEFAULT_LAMBDAS,
    beta: float = 0.1,
    seed: int = 0,
    count_metric: str = "proportional",
    p: float = 0.5,
    stl_task: str | int | None = None,
) -> Scheduler:
    """Build the scheduler ``name`` (``dst``, ``mtl``, ``random`` or ``stl``) for ``tasks``.

    Args:
        name: Scheduler name, one of :data:`SCHEDULER_NAMES`.
        tasks: The experiment's tasks; DST reads their ``depth`` and ``n_labelled``.
        lambdas: DST weights, see :class:`DSTScheduler`.
        beta: DST discount of the R' moving average.
        seed: Seed of the gate draws of ``dst`` and ``random``.
        count_metric: DST count term, ``"proportional"`` or ``"inverse"``.
        p: Probability of each task being on, for ``random``.
        stl_task: The task trained alone by ``stl``, as a task name or index.

    Raises:
        UsageError: The name is unknown, ``stl`` has no valid ``stl_task``, or a
            scheduler argument is invalid.
    """
    names = [task.name for task in tasks]
    if not names:
        raise UsageError("the experiment has no tasks; a scheduler needs at least one task")
    if name == "dst":
        return DSTScheduler(
            [task.depth for task in tasks],
            [task.n_labelled for task in tasks],
            lambdas=lambdas,
            beta=beta,
            seed=seed,
            count_metric=count_metric,
            task_names=names,
        )
    if name == "mtl":
        return MTLScheduler(len(names), task_names=names)
    if name == "random":
        return RandomScheduler(len(names), p, seed, task_names=names)
    if name == "stl":
        return STLScheduler(len(names), _stl_task_index(stl_task, names), task_names=names)
    raise UsageError(f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULER_NAMES)}")


def _stl_task_index(stl_task: str | int | None, names: Sequence[str]) -> int:
    listed = ", ".join(repr(name) for name in names)
    if stl_task is None:
        raise UsageError(
            f"scheduler 'stl' needs stl_task, the task to train alone: one of {listed}"
        )
    if isinstance(stl_task, str):
        if stl_task in names:
            return names.index(stl_task)
        raise UsageError(f"unknown STL task {stl_task!r}; use one of {listed} or an index")
    if isinstance(stl_task, bool) or not isinstance(stl_task, int):
        raise UsageError(f"stl_task must be a task name or index, got {stl_task!r}")
    if not 0 <= stl_task < len(names):
        raise UsageError(
            f"STL task index {stl_task} is out of range; use an index from 0 to"
            f" {len(names) - 1} or one of {listed}"
        )
    return stl_task


def _lambda_values(lambdas: Sequence[float] | Mapping[str, float]) -> tuple[float, ...]:
    if isinstance(lambdas, Mapping):
        unknown = sorted(set(lambdas) - set(LAMBDA_NAMES))
        missing = [name for name in LAMBDA_NAMES if name not in lambdas]
        if unknown or missing:
            problem = f"unknown key {unknown[0]!r}" if unknown else f"missing key {missing[0]!r}"
            raise UsageError(
                f"invalid lambdas mapping ({problem}); use exactly the keys"
                f" {', '.join(LAMBDA_NAMES)}"
            )
        items: list[Any] = [lambdas[name] for name in LAMBDA_NAMES]
    elif isinstance(lambdas, str):
        raise UsageError(f"lambdas must be numbers, got the text {lambdas!r}; use parse_lambdas")
    else:
        items = list(lambdas)
    if len(items) != len(LAMBDA_NAMES):
        raise UsageError(
            f"expected 5 lambdas ({', '.join(LAMBDA_NAMES)}), got {len(items)}: {items!r};"
            " give one weight per term, such as 0.2,0.2,0.2,0.2,0.2"
        )
    try:
        return tuple(float(item) for item in items)
    except (TypeError, ValueError):
        raise UsageError(
            f"lambdas must be numbers, got {items!r}; give five weights that sum to 1"
        ) from None


def _positive_values(
    name: str, values: Sequence[float], task_names: Sequence[str] | None
) -> FloatArray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise UsageError(
            f"{name} must be a sequence of numbers, got {values!r}; give one number per task"
        ) from None
    if array.ndim != 1 or array.size == 0:
        raise UsageError(
            f"{name} must be a non-empty list with one value per task, got {values!r}"
        )
    for task, value in enumerate(array.tolist()):
        if not math.isfinite(value) or value <= 0:
            label = f"{name}[{task}]"
            if task_names is not None and len(task_names) == array.size:
                label += f" ({task_names[task]!r})"
            raise UsageError(
                f"{label} must be a positive number, got {value:g}; every task needs"
                " a depth and a labelled count above 0"
            )
    return array


def _checked_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}; use 0 or above")
    return int(seed)


def _checked_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0.0 <= beta <= 1.0:
        raise UsageError(f"beta must be a number in [0, 1], got {beta!r}; the DST default is 0.1")
    return float(beta)


def _incompleteness(losses: FloatArray, v_first: FloatArray) -> FloatArray:
    """Return P_u = min(1, I / mean I) with I = V(k) / V(1), by the rules of DSTScheduler."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        ratio = np.divide(losses, v_first, out=np.full_like(losses, RATIO_CAP), where=v_first > 0)
    ratio = np.where(losses == 0, 0.0, np.minimum(ratio, RATIO_CAP))
    mean = ratio.mean()
    if mean == 0:
        return np.ones_like(losses)
    return np.minimum(1.0, ratio / mean)


def _rate_of_fall(v_previous: FloatArray, losses: FloatArray, p_u: FloatArray) -> FloatArray:
    """Return R = (V(k-1) - V(k)) / V(k-1) / P_u, by the rules of DSTScheduler."""
    change = v_previous - losses
    rise_from_zero = np.where(losses == 0, 0.0, -RATIO_CAP)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        relative = np.divide(change, v_previous, out=rise_from_zero, where=v_previous > 0)
        rate = relative / np.maximum(p_u, P_U_FLOOR)
    return np.clip(rate, -RATIO_CAP, RATIO_CAP)


def _stagnancy(r_ema: FloatArray) -> FloatArray:
    """Return P_r = min(1, mean R' / R'), 1 where R' = 0 and everywhere when mean R' = 0."""
    # When mean R' = 0, every R' is 0, so every task takes the value 1 from ``out``.
    mean = r_ema.mean()
    with np.errstate(over="ignore"):
        ratio = np.divide(mean, r_ema, out=np.ones_like(r_ema), where=r_ema > 0)
    return np.minimum(1.0, ratio)


def _builtin_rng_state(rng: np.random.Generator) -> dict[str, Any]:
    state = rng.bit_generator.state
    return {key: dict(value) if isinstance(value, dict) else value for key, value in state.items()}


def _to_list(values: FloatArray | None) -> list[float] | None:
    return None if values is None else values.tolist()


def _to_array(values: Sequence[float] | None) -> FloatArray | None:
    return None if values is None else np.asarray(values, dtype=np.float64)
