"""Optuna studies: ``study create``, the search space, the worker loop and the objective.

The study lock (see :mod:`dst._study_storage`) serialises the few steps that must not
interleave across workers and machines: creating the study and enqueueing its rows,
creating the MLflow parent run, and claiming a trial. Claiming under the lock is how the
study runs exactly ``n_trials``. A worker first fails stale trials (heartbeats), then counts
the trials, then calls Optuna's ``ask()``, which pops the oldest enqueued row or
samples a new trial. Optuna's ``MaxTrialsCallback`` is not used, because it stops a worker
only after its trial ends, so concurrent workers overshoot the budget.

Budget. ``n_trials`` counts COMPLETE, PRUNED and FAILED trials, except failed ones that
were queued again. Four kinds of failed trial are queued again:

- a trial whose worker stopped sending heartbeats (Optuna's ``RetryFailedTrialCallback``);
- a trial interrupted by SIGTERM or Ctrl-C;
- a trial that hit a usage error on one worker, such as a missing data folder;
- a trial whose worker stopped because the tracking server did not respond.

A retried trial resumes from the last epoch checkpoint of its first attempt when the
workers share a ``--checkpoint-dir``. A diverged trial (NaN loss) counts
and is not retried. Running trials count too while they run, so a worker never starts a
trial that the budget has no room for. It waits instead, in case a running trial is retried.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from mlflow.tracking import MlflowClient
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryFailedTrialCallback
from optuna.trial import FrozenTrial, TrialState

from dst import _tracking
from dst._errors import DivergedError, UsageError
from dst._experiment import Experiment, create_experiment, resolve_experiment
from dst._names import task_keys
from dst._scheduler import LAMBDA_NAMES
from dst._signals import deferred_signals
from dst._study_file import DATA_DIR_OPTION, Row, StudyConfig
from dst._study_storage import (
    check_distinct_databases,
    check_storage,
    display_url,
    open_storage,
    resolve_tracking_uri,
    study_lock,
)
from dst._trainer import (
    CHECKPOINT_NAME,
    Callback,
    EpochRecord,
    TrainConfig,
    Trainer,
    resolve_config,
    train_experiment,
)

_logger = logging.getLogger(__name__)

CONFIG_ATTR = "dst_config"
"""Study user attribute with the resolved study config, so workers need only the name."""
TRACKING_URI_ATTR = "mlflow_tracking_uri"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
REPORT_TRIALS_ATTR = "report_n_trials"
ROW_ATTR = "row"
RUN_ID_ATTR = "mlflow_run_id"
FAIL_REASON_ATTR = "fail_reason"
_RETRY_HISTORY = "retry_history"

LAMBDA_RAW_LOW = 1e-6
"""Lower bound of the uniform draws ``u_i`` whose ``-log`` gives the simplex weights."""


# Study creation.


@dataclass(frozen=True)
class CreatedStudy:
    """Result of :func:`create_study`: the study and the counts of new and existing rows."""

    study: optuna.Study
    n_enqueued: int
    n_existing: int
    parent_run_id: str


def create_study(
    config: StudyConfig, storage_url: str, tracking_uri: str, *, store_tracking_uri: bool
) -> CreatedStudy:
    """Create the study, enqueue each row once and create the MLflow parent run.

    Idempotent: rows are matched by label under the study lock, so running it twice, or
    from two machines at once, enqueues each row once. Every input is checked before
    anything is written.

    Raises:
        UsageError: Invalid experiment options, a missing data folder, an unreachable
            storage or tracking server, or an existing study with a different config.
    """
    check_distinct_databases(storage_url, tracking_uri)
    check_experiment(config)
    _tracking.check_tracking_uri(tracking_uri)
    check_storage(storage_url, must_exist=False)
    if config.n_trials < len(config.rows):
        _logger.warning(
            "study %s has %d rows but n_trials %d; only the first %d rows will run",
            config.name,
            len(config.rows),
            config.n_trials,
            config.n_trials,
        )
    client = MlflowClient(tracking_uri=tracking_uri)
    with study_lock(storage_url, config.name):
        storage = open_storage(storage_url, create_tables=True)
        try:
            # Loading first keeps Optuna's "Using an existing study" line out of the output
            # when the stored config then differs and the command fails.
            study = optuna.load_study(study_name=config.name, storage=storage)
        except KeyError:
            study = optuna.create_study(
                storage=storage, study_name=config.name, direction="minimize"
            )
        _store_config(study, config, tracking_uri if store_tracking_uri else None)
        n_enqueued, n_existing = _enqueue_rows(study, config)
        parent_run_id = ensure_parent_run(client, study, config)
        # Close the pooled connections now; the study reconnects if it is used again.
        storage.engine.dispose()
    _logger.info(
        "study %s in %s: %d rows enqueued, %d already there, n_trials %d; MLflow %s, parent"
        " run %s",
        config.name,
        display_url(storage_url),
        n_enqueued,
        n_existing,
        config.n_trials,
        tracking_uri,
        parent_run_id,
    )
    return CreatedStudy(study, n_enqueued, n_existing, parent_run_id)


def check_experiment(config: StudyConfig) -> Experiment:
    """Instantiate the study's experiment, checking its options and data folder."""
    experiment_class = resolve_experiment(config.experiment)
    if DATA_DIR_OPTION in experiment_class.defaults:
        data_dir = config.options.get(DATA_DIR_OPTION) or experiment_class.defaults.get(
            DATA_DIR_OPTION
        )
        if not data_dir:
            raise UsageError(
                f"experiment {config.experiment!r} of study {config.name!r} reads its data"
                " from a folder; pass --data-dir PATH"
            )
        if not Path(data_dir).exists():
            raise UsageError(
                f"data folder {str(data_dir)!r} of study {config.name!r} does not exist;"
                " pass the right --data-dir PATH"
            )
        if Path(data_dir).is_dir() and not any(Path(data_dir).iterdir()):
            raise UsageError(
                f"data folder {str(data_dir)!r} of study {config.name!r} is empty;"
                " pass the folder that contains the experiment's data as --data-dir PATH"
            )
    experiment = create_experiment(config.experiment, config.options)
    # An experiment may check the layout of its data without loading it.
    check_data = getattr(experiment, "check_data", None)
    if callable(check_data):
        check_data()
    return experiment


def _store_config(study: optuna.Study, config: StudyConfig, tracking_uri: str | None) -> None:
    stored = study.user_attrs.get(CONFIG_ATTR)
    values = config.to_dict()
    if stored is None:
        if study.get_trials(deepcopy=False):
            raise UsageError(
                f"study {config.name!r} already exists without a dst config; give the study"
                " another [study].name"
            )
        study.set_user_attr(CONFIG_ATTR, values)
    else:
        _check_same_config(config.name, stored, values)
    if tracking_uri and study.user_attrs.get(TRACKING_URI_ATTR) != tracking_uri:
        study.set_user_attr(TRACKING_URI_ATTR, tracking_uri)


def _check_same_config(name: str, stored: dict[str, Any], values: dict[str, Any]) -> None:
    # The data folder is machine-local, so each machine may give its own.
    stored_options = {k: v for k, v in stored["options"].items() if k != DATA_DIR_OPTION}
    options = {k: v for k, v in values["options"].items() if k != DATA_DIR_OPTION}
    for key in values:
        old, new = (stored_options, options) if key == "options" else (stored[key], values[key])
        if old != new:
            raise UsageError(
                f"study {name!r} already exists with {key} = {old!r}, not {new!r}; run the"
                " same file and overrides again, or give the study another [study].name"
            )


def _enqueue_rows(study: optuna.Study, config: StudyConfig) -> tuple[int, int]:
    existing = {
        trial.user_attrs[ROW_ATTR]["label"]
        for trial in study.get_trials(deepcopy=False)
        if ROW_ATTR in trial.user_attrs
    }
    n_enqueued = 0
    for row in config.rows:
        if row.label in existing:
            continue
        study.enqueue_trial(row_params(config, row), user_attrs={ROW_ATTR: row.to_dict()})
        n_enqueued += 1
    return n_enqueued, len(config.rows) - n_enqueued


def ensure_parent_run(client: MlflowClient, study: optuna.Study, config: StudyConfig) -> str:
    """Return the study's MLflow parent run, creating it (and the experiment) if missing.

    Call under the study lock: the lookup by tag and the creation then cannot interleave
    with another process, so the study has one parent run per tracking server.
    """
    experiment_id = _tracking.get_or_create_experiment(client, config.name)
    run_id = _tracking.find_parent_run(client, experiment_id, config.name)
    if run_id is None:
        run_id = _tracking.create_parent_run(client, experiment_id, config.name, config.to_dict())
    if study.user_attrs.get(PARENT_RUN_ATTR) != run_id:
        study.set_user_attr(PARENT_RUN_ATTR, run_id)
    return run_id


# Search space.


def row_params(config: StudyConfig, row: Row) -> dict[str, float]:
    """Return the Optuna params that place an enqueued row in the study's search space.

    The sampler then learns from the row like from a sampled trial. A lambda ``l`` maps to
    the uniform draw ``u = exp(-l)``, which the sampling of :func:`sample_lambdas` turns
    back into the same weights.
    """
    if row.scheduler != "dst":
        return {}
    params: dict[str, float] = {}
    if config.search_lambdas:
        for name, value in zip(LAMBDA_NAMES, row.lambdas, strict=True):
            params[f"u_{name}"] = math.exp(-value)
    if config.search_beta is not None:
        low, high = config.search_beta
        if low <= row.beta <= high:
            params["beta"] = row.beta
    return params


def sample_lambdas(trial: optuna.Trial) -> tuple[float, ...]:
    """Sample the five lambdas uniformly on the simplex by normalised exponentials.

    Each ``u_i`` is uniform on ``[1e-6, 1]`` and ``x_i = -log(u_i)`` is exponential, so
    ``x / sum(x)`` is uniform on the simplex (a flat Dirichlet). When every draw is 1, every
    ``x_i`` is 0 and the weights fall back to 0.2 each.
    """
    draws = [trial.suggest_float(f"u_{name}", LAMBDA_RAW_LOW, 1.0) for name in LAMBDA_NAMES]
    exponentials = [-math.log(draw) for draw in draws]
    total = math.fsum(exponentials)
    if total <= 0.0:
        return tuple(1.0 / len(LAMBDA_NAMES) for _ in LAMBDA_NAMES)
    return tuple(value / total for value in exponentials)


def trial_row(config: StudyConfig, trial: optuna.Trial) -> Row:
    """Return the settings of ``trial``: its enqueued row, or a sample of the search space."""
    stored = trial.user_attrs.get(ROW_ATTR)
    if stored is not None:
        row = Row.from_dict(stored)
        # Suggest the fixed params too, so they are recorded for the sampler.
        for name in row_params(config, row):
            if name.startswith("u_"):
                trial.suggest_float(name, LAMBDA_RAW_LOW, 1.0)
            elif config.search_beta is not None:
                trial.suggest_float(name, *config.search_beta)
        return row
    row = config.defaults
    lambdas = sample_lambdas(trial) if config.search_lambdas else row.lambdas
    beta = row.beta
    if config.search_beta is not None:
        beta = trial.suggest_float("beta", *config.search_beta)
    return Row("", row.scheduler, lambdas, beta, row.count_metric, row.p)


def make_sampler(config: StudyConfig, salt: int) -> optuna.samplers.BaseSampler:
    """Return the study's sampler, seeded from the study seed and ``salt``.

    Each claim gets its own seed (the salt is the number of trials so far), so concurrent
    workers do not draw the same random startup trials while one worker stays reproducible.
    """
    seed = None
    if config.sampler_seed is not None:
        seed = int(hashlib.sha256(f"{config.sampler_seed}:{salt}".encode()).hexdigest()[:8], 16)
    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=config.sampler_startup_trials, constant_liar=True
    )


def make_pruner(config: StudyConfig) -> optuna.pruners.BasePruner:
    if config.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=config.pruner_startup_trials,
            n_warmup_steps=config.pruner_warmup_steps,
        )
    return optuna.pruners.NopPruner()


# Workers.


@dataclass(frozen=True)
class WorkerSettings:
    """Machine-local settings of a worker.

    Attributes:
        study_name: The study to work on.
        storage_url: Optuna storage URL.
        tracking_uri: ``--tracking-uri``; None falls back to the environment, the URI stored
            with the study, then ``sqlite:///mlflow.db``.
        data_dir: This machine's data folder, replacing the study's.
        device: Torch device, ``auto`` picks CUDA when available.
        num_workers: DataLoader worker processes.
        checkpoint_dir: Folder of per-epoch checkpoints, None for none.
        heartbeat_interval: Seconds between heartbeats of a running trial.
        grace_period: Seconds without a heartbeat after which a trial counts as stale.
        max_retry: Times a stale trial is queued again.
        poll_interval: Seconds between looks at a study whose last trials run elsewhere.
        spool_dir: Folder of the epochs kept while the tracking server does not respond.
        outage_limit_s: Seconds of training without the tracking server before the worker
            stops.
    """

    study_name: str
    storage_url: str
    tracking_uri: str | None = None
    data_dir: str | None = None
    device: str = "auto"
    num_workers: int = 0
    checkpoint_dir: Path | None = None
    heartbeat_interval: int = 30
    grace_period: int = 120
    max_retry: int = 3
    poll_interval: float = 5.0
    spool_dir: Path = Path("dst-mlflow-spool")
    outage_limit_s: float = _tracking.DEFAULT_OUTAGE_LIMIT_S


class WorkerStopped(KeyboardInterrupt):
    """SIGTERM arrived; the worker ends its trial as interrupted and stops, as on Ctrl-C."""


@dataclass
class WorkerContext:
    """Everything a worker uses for its trials, resolved once at start."""

    settings: WorkerSettings
    study: optuna.Study
    storage: RDBStorage
    """Optuna's storage of ``study``, which also records the heartbeats of running trials."""
    config: StudyConfig
    tracking_uri: str
    client: MlflowClient
    experiment_id: str
    parent_run_id: str
    experiment: Experiment
    stale_handler: StaleTrialHandler | None = None
    n_run: int = 0
    task_names: list[str] = field(default_factory=list)
    """Task names of the experiment, known once the first run has loaded the data."""


@dataclass
class StaleTrialHandler:
    """Heartbeat-stale trial callback: ends the dead attempt's MLflow runs, then retries.

    The retry is Optuna's ``RetryFailedTrialCallback``; the copy it queues drops the dead
    attempt's MLflow run id.
    """

    max_retry: int
    client: MlflowClient | None = None
    experiment_id: str | None = None
    retry: Any = field(default=None)

    def __post_init__(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (ExperimentalWarning, FutureWarning))
            self.retry = RetryFailedTrialCallback(max_retry=self.max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        _logger.warning(
            "trial %d of study %s stopped sending heartbeats; marking it failed",
            trial.number,
            study.study_name,
        )
        if self.client is not None and self.experiment_id is not None:
            _fail_stale_runs(self.client, self.experiment_id, trial)
        requeue_trial(study, trial, self.retry)


def _fail_stale_runs(client: MlflowClient, experiment_id: str, trial: FrozenTrial) -> None:
    filter_string = (
        f"tags.`{_tracking.TAG_TRIAL_NUMBER}` = '{trial.number}' and attributes.status = 'RUNNING'"
    )
    reason = "the worker stopped sending heartbeats; the trial was queued again"
    try:
        runs = client.search_runs([experiment_id], filter_string=filter_string)
        for run in runs:
            client.set_tag(run.info.run_id, _tracking.TAG_FAIL_REASON, reason)
            client.set_terminated(run.info.run_id, _tracking.FAILED)
            _logger.info(
                "ended MLflow run %s of stale trial %d FAILED", run.info.run_id, trial.number
            )
    except Exception as error:  # noqa: BLE001 - the retry must happen even if MLflow fails
        _logger.error("could not end the MLflow runs of stale trial %d: %s", trial.number, error)


def requeue_trial(study: optuna.Study, trial: FrozenTrial, retry: Any) -> None:
    """Queue a copy of the failed ``trial`` again, without its MLflow run id and reason."""
    attempt = copy.deepcopy(trial)
    attempt.user_attrs = {
        key: value
        for key, value in trial.user_attrs.items()
        if key not in (RUN_ID_ATTR, FAIL_REASON_ATTR)
    }
    n_before = len(study.get_trials(deepcopy=False))
    retry(study, attempt)
    if len(study.get_trials(deepcopy=False)) > n_before:
        _logger.info("queued trial %d of study %s again", trial.number, study.study_name)
    else:
        _logger.warning(
            "trial %d of study %s reached the retry limit and stays failed",
            trial.number,
            study.study_name,
        )


@dataclass(frozen=True)
class TrialCounts:
    """Trials of a study by state; ``failed`` leaves out failed trials queued again."""

    complete: int
    pruned: int
    failed: int
    running: int
    waiting: int

    @property
    def settled(self) -> int:
        """Trials that use up the budget for good."""
        return self.complete + self.pruned + self.failed


def count_trials(study: optuna.Study) -> TrialCounts:
    trials = study.get_trials(deepcopy=False)
    retried = {number for trial in trials for number in trial.system_attrs.get(_RETRY_HISTORY, [])}

    def count(state: TrialState) -> int:
        return sum(1 for trial in trials if trial.state == state)

    failed = sum(1 for t in trials if t.state == TrialState.FAIL and t.number not in retried)
    return TrialCounts(
        complete=count(TrialState.COMPLETE),
        pruned=count(TrialState.PRUNED),
        failed=failed,
        running=count(TrialState.RUNNING),
        waiting=count(TrialState.WAITING),
    )


def open_worker(settings: WorkerSettings) -> WorkerContext:
    """Check every input of a worker and open its storage, study and MLflow experiment.

    Raises:
        UsageError: The storage or the study does not exist, the tracking server does not
            respond, or the experiment's data folder is missing.
    """
    check_storage(settings.storage_url, must_exist=True)
    stale_handler = StaleTrialHandler(settings.max_retry)
    study, storage = load_study(settings, stale_handler)
    config = StudyConfig.from_dict(study.user_attrs[CONFIG_ATTR])
    if settings.data_dir is not None:
        options = {**config.options, DATA_DIR_OPTION: settings.data_dir}
        config = StudyConfig.from_dict({**config.to_dict(), "options": options})
    tracking_uri = resolve_tracking_uri(
        settings.tracking_uri, study.user_attrs.get(TRACKING_URI_ATTR)
    )
    check_distinct_databases(settings.storage_url, tracking_uri)
    _tracking.check_tracking_uri(tracking_uri)
    experiment = check_experiment(config)
    client = MlflowClient(tracking_uri=tracking_uri)
    with study_lock(settings.storage_url, config.name):
        parent_run_id = ensure_parent_run(client, study, config)
    experiment_id = _tracking.get_or_create_experiment(client, config.name)
    stale_handler.client = client
    stale_handler.experiment_id = experiment_id
    study.pruner = make_pruner(config)
    return WorkerContext(
        settings=settings,
        study=study,
        storage=storage,
        config=config,
        tracking_uri=tracking_uri,
        client=client,
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        experiment=experiment,
        stale_handler=stale_handler,
    )


def load_study(
    settings: WorkerSettings, stale_handler: StaleTrialHandler
) -> tuple[optuna.Study, RDBStorage]:
    """Load ``settings.study_name``; an unknown name lists the studies in the storage."""
    where = display_url(settings.storage_url)
    try:
        storage = open_storage(
            settings.storage_url,
            create_tables=False,
            heartbeat_interval=settings.heartbeat_interval,
            grace_period=settings.grace_period,
            stale_trial_callback=stale_handler,
        )
        names = optuna.study.get_all_study_names(storage)
    except sqlalchemy.exc.SQLAlchemyError as error:
        raise UsageError(
            f"study storage {where} has no Optuna tables ({type(error).__name__}); run"
            " 'dst study create FILE' with this --storage first"
        ) from None
    if settings.study_name not in names:
        listed = ", ".join(sorted(names)) or "none"
        raise UsageError(
            f"study {settings.study_name!r} not found in {where}; existing studies: {listed};"
            " create it with 'dst study create FILE'"
        )
    study = optuna.load_study(study_name=settings.study_name, storage=storage)
    if CONFIG_ATTR not in study.user_attrs:
        raise UsageError(
            f"study {settings.study_name!r} in {where} was not created by 'dst study create';"
            " create a dst study from a study file"
        )
    return study, storage


def run_worker(settings: WorkerSettings) -> int:
    """Run trials of the study until it has ``n_trials`` settled trials; return how many ran.

    SIGTERM ends the running trial as interrupted (queued again) and stops the worker.
    """
    context = open_worker(settings)
    _logger.info(
        "worker started: study %s, pid %d, storage %s, MLflow %s",
        settings.study_name,
        os.getpid(),
        display_url(settings.storage_url),
        context.tracking_uri,
    )
    with _tracking.quiet_run_urls():
        with _sigterm_stops_worker():
            try:
                _work(context)
            finally:
                _logger.info(
                    "worker stopped: study %s, %d trials run by this worker",
                    settings.study_name,
                    context.n_run,
                )
        try:
            finish_study(context)
        finally:
            # Close the pooled connections now, for callers that go on running.
            context.storage.engine.dispose()
    return context.n_run


def _work(context: WorkerContext) -> None:
    waiting_logged = False
    while True:
        raise_if_stop_requested()
        claim = claim_trial(context)
        if isinstance(claim, optuna.Trial):
            waiting_logged = False
            run_claimed_trial(context, claim)
            context.n_run += 1
            continue
        if claim == "done":
            return
        if claim == "wait":
            if not waiting_logged:
                _logger.info(
                    "study %s: the last trials run on other workers; waiting in case one"
                    " is retried",
                    context.config.name,
                )
                waiting_logged = True
            time.sleep(context.settings.poll_interval)


def claim_trial(context: WorkerContext) -> optuna.Trial | str:
    """Start the next trial under the study lock, or return ``"done"`` or ``"wait"``."""
    study, config = context.study, context.config
    with study_lock(context.settings.storage_url, config.name):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        counts = count_trials(study)
        if counts.settled >= config.n_trials:
            return "done"
        if counts.settled + counts.running >= config.n_trials:
            return "wait"
        study.sampler = make_sampler(config, len(study.get_trials(deepcopy=False)))
        with warnings.catch_warnings():
            # Optuna warns that heartbeats need optimize(); _Heartbeat records them here.
            warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
            trial = study.ask()
        # A running trial without any heartbeat never counts as stale, so record one at once.
        context.storage.record_heartbeat(trial._trial_id)  # noqa: SLF001
        return trial


_stop_requested = threading.Event()
"""Set by the SIGTERM handler of :func:`_sigterm_stops_worker`."""


@contextmanager
def _sigterm_stops_worker() -> Iterator[None]:
    """Make SIGTERM raise :class:`WorkerStopped` in the main thread, as Ctrl-C does.

    A handler's exception is lost when the handler happens to run inside a garbage
    collector callback or ``__del__``, which Python ends with "Exception ignored". So the
    handler also sets :data:`_stop_requested`, which the worker checks after every epoch
    and before every claim (:func:`raise_if_stop_requested`).
    """
    _stop_requested.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        # Ignore a repeated signal, so that ending the interrupted trial is not cut short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop_requested.set()
        raise WorkerStopped(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def raise_if_stop_requested() -> None:
    """Raise :class:`WorkerStopped` if SIGTERM arrived but its exception was lost."""
    if _stop_requested.is_set():
        raise WorkerStopped("signal SIGTERM")


class _StopCheck(Callback):
    """Callback that stops training at the end of an epoch once SIGTERM is recorded."""

    def on_epoch_end(self, trainer: Trainer, record: EpochRecord) -> None:
        raise_if_stop_requested()


class _Heartbeat:
    """Records the heartbeat of a running trial every ``interval`` seconds on a thread."""

    def __init__(self, storage: RDBStorage, trial_id: int, interval: int) -> None:
        self.storage = storage
        self.trial_id = trial_id
        self.interval = interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="dst-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self.storage.record_heartbeat(self.trial_id)
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.thread.join()

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except sqlalchemy.exc.SQLAlchemyError as error:
                _logger.warning("heartbeat of trial id %d failed: %s", self.trial_id, error)


class _TrialFailed(Exception):
    """A trial that cannot give a value (every validation error NaN)."""


def run_claimed_trial(context: WorkerContext, trial: optuna.Trial) -> None:
    """Run the objective of a claimed trial and tell Optuna how it ended."""
    study = context.study
    tree = _tracking.RunTree(
        context.client, context.experiment_id, context.config.name, trial.number
    )
    started = time.perf_counter()
    _logger.info("trial %d of study %s started", trial.number, study.study_name)
    interval = context.settings.heartbeat_interval
    with _Heartbeat(context.storage, trial._trial_id, interval):  # noqa: SLF001
        try:
            value = objective(context, trial, tree)
        except optuna.TrialPruned:
            tree.end_open(_tracking.KILLED)
            study.tell(trial, state=TrialState.PRUNED)
            _log_end(trial, "pruned", started)
            return
        except (DivergedError, _TrialFailed) as error:
            _fail_trial(context, trial, tree, error, requeue=False)
            return
        except (KeyboardInterrupt, UsageError, _tracking.TrackingUnavailable) as error:
            _fail_trial(context, trial, tree, error, requeue=True)
            raise
        except Exception as error:
            _fail_trial(context, trial, tree, error, requeue=False)
            raise
    # Ctrl-C or SIGTERM during tell would leave a finished trial running until it is stale.
    with deferred_signals():
        study.tell(trial, value)
    _log_end(trial, f"complete with value {value:.4f}", started)


def _log_end(trial: optuna.Trial, outcome: str, started: float) -> None:
    _logger.info(
        "trial %d %s after %.1f s; MLflow run %s",
        trial.number,
        outcome,
        time.perf_counter() - started,
        trial.user_attrs.get(RUN_ID_ATTR),
    )


def _fail_trial(
    context: WorkerContext,
    trial: optuna.Trial,
    tree: _tracking.RunTree,
    error: BaseException,
    *,
    requeue: bool,
) -> None:
    reason = f"{type(error).__name__}: {error}"
    interrupted = isinstance(error, KeyboardInterrupt)
    status = _tracking.KILLED if interrupted else _tracking.FAILED
    if isinstance(error, _tracking.TrackingUnavailable) and error.spool_path is not None:
        # The server does not respond, so 'dst replay' ends the runs after their epochs.
        _tracking.keep_run_ends(error.spool_path, tree.open_runs, status, reason)
        tree.open_runs.clear()
    else:
        tree.end_open(status, reason)
    trial.set_user_attr(FAIL_REASON_ATTR, reason)
    frozen = context.study.tell(trial, state=TrialState.FAIL)
    if interrupted:
        _logger.warning("trial %d interrupted: %s", trial.number, reason)
    elif isinstance(error, (DivergedError, _TrialFailed)):
        _logger.warning("trial %d failed: %s", trial.number, reason)
    else:
        _logger.error("trial %d failed: %s", trial.number, reason)
    if requeue and context.stale_handler is not None:
        requeue_trial(context.study, frozen, context.stale_handler.retry)


# The objective.


def objective(context: WorkerContext, trial: optuna.Trial, tree: _tracking.RunTree) -> float:
    """Train every seed of ``trial`` and return the mean best validation average error."""
    config = context.config
    row = trial_row(config, trial)
    _record_row(trial, row)
    trial_run_id = _create_trial_run(context, trial, tree, row)

    several = len(config.seeds) > 1
    summaries = []
    for seed_index, seed in enumerate(config.seeds):
        run_id = trial_run_id
        if several:
            spec = run_spec(context, row, str(seed))
            run_id = tree.create(trial_run_id, "seed", f"seed {seed}", spec)
        summaries.append(train_seed(context, trial, tree, row, seed_index, run_id))
        if several:
            tree.finish(run_id)

    value = summaries[0].best_val_avg_error
    if several:
        value = _tracking.log_mean_summary(context.client, trial_run_id, summaries)
    if not math.isfinite(value):
        raise _TrialFailed("every validation error is NaN; the trial has no value")
    tree.finish(trial_run_id)
    return value


def _create_trial_run(
    context: WorkerContext, trial: optuna.Trial, tree: _tracking.RunTree, row: Row
) -> str:
    seeds = ",".join(str(seed) for seed in context.config.seeds)
    name = f"trial {trial.number}" + (f": {row.label}" if row.label else "")
    spec = run_spec(context, row, seeds)
    run_id = tree.create(context.parent_run_id, "trial", name, spec, _tracking.row_tags(row.label))
    trial.set_user_attr(RUN_ID_ATTR, run_id)
    url = _tracking.run_url(context.tracking_uri, context.experiment_id, run_id)
    _logger.info("trial %d: MLflow run %s, %s", trial.number, url or run_id, _describe(row))
    return run_id


def _record_row(trial: optuna.Trial, row: Row) -> None:
    trial.set_user_attr("scheduler", row.scheduler)
    if row.label:
        trial.set_user_attr("row_label", row.label)
    if row.scheduler == "dst":
        for name, value in zip(LAMBDA_NAMES, row.lambdas, strict=True):
            trial.set_user_attr(f"lambda_{name}", value)
        trial.set_user_attr("beta", row.beta)
        trial.set_user_attr("count_metric", row.count_metric)
    if row.scheduler == "random":
        trial.set_user_attr("p", row.p)


def _describe(row: Row) -> str:
    if row.scheduler == "dst":
        lambdas = ", ".join(f"{value:.3g}" for value in row.lambdas)
        return f"dst lambdas ({lambdas}) beta {row.beta:.3g}"
    if row.scheduler == "random":
        return f"random p {row.p:.3g}"
    return row.scheduler


def run_spec(context: WorkerContext, row: Row, seed: str) -> _tracking.RunSpec:
    """Return what a run of ``row`` trains, with lr and batch size resolved."""
    config = context.config
    resolved = resolve_config(
        TrainConfig(n_epochs=config.n_epochs, lr=config.lr, batch_size=config.batch_size),
        context.experiment,
    )
    return _tracking.RunSpec(
        experiment=config.experiment,
        options=context.experiment.options,
        scheduler=row.scheduler,
        lambdas=row.lambdas,
        beta=row.beta,
        count_metric=row.count_metric,
        p=row.p,
        seed=seed,
        n_epochs=config.n_epochs,
        lr=float(resolved.lr or 0.0),
        batch_size=int(resolved.batch_size or 0),
    )


class _PruningCallback(Callback):
    """Reports each epoch's validation average error to Optuna and raises TrialPruned.

    Seed ``i`` reports at steps ``i * n_epochs + epoch``, so the median pruner compares the
    same epoch of the same seed position across trials.
    """

    def __init__(self, trial: optuna.Trial, step_offset: int) -> None:
        self.trial = trial
        self.step_offset = step_offset

    def on_epoch_end(self, trainer: Trainer, record: EpochRecord) -> None:
        if not math.isfinite(record.val_avg_error):
            return
        step = self.step_offset + record.epoch
        self.trial.report(record.val_avg_error, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {record.epoch} (step {step})")


class _TaskNamesCallback(Callback):
    def __init__(self, context: WorkerContext) -> None:
        self.context = context

    def on_train_start(self, trainer: Trainer) -> None:
        self.context.task_names = [task.name for task in trainer.tasks]


def train_seed(
    context: WorkerContext,
    trial: optuna.Trial,
    tree: _tracking.RunTree,
    row: Row,
    seed_index: int,
    run_id: str,
) -> _tracking.RunSummary:
    """Train one seed of ``row`` into ``run_id``; STL trains one run per task below it."""
    if row.scheduler == "stl":
        return train_stl_seed(context, trial, tree, row, seed_index, run_id)
    config = context.config
    logger = _epoch_logger(context, run_id, tree)
    callbacks: list[Callback] = [logger, _TaskNamesCallback(context), _StopCheck()]
    if config.pruner != "none":
        callbacks.append(_PruningCallback(trial, seed_index * config.n_epochs))

    seed = config.seeds[seed_index]
    checkpoint_dir = _checkpoint_dir(context, trial, seed)
    try:
        train_experiment(
            context.experiment,
            row.scheduler,
            train_config(context, seed, checkpoint_dir),
            lambdas=row.lambdas,
            beta=row.beta,
            count_metric=row.count_metric,
            p=row.p,
            callbacks=callbacks,
            resume_from=_resume_path(context, trial, checkpoint_dir),
        )
    except BaseException:
        logger.close_after_error()
        raise
    assert logger.summary is not None
    return logger.summary


def _epoch_logger(
    context: WorkerContext, run_id: str, tree: _tracking.RunTree, task_index: int | None = None
) -> _tracking.EpochLogger:
    """Return the epoch logger of one run, keeping epochs on disk while MLflow is down."""
    delivery = _tracking.Delivery(
        context.client, context.settings.spool_dir, context.settings.outage_limit_s
    )
    return _tracking.EpochLogger(
        context.client, run_id, tree, task_index=task_index, delivery=delivery
    )


def train_stl_seed(
    context: WorkerContext,
    trial: optuna.Trial,
    tree: _tracking.RunTree,
    row: Row,
    seed_index: int,
    parent_run_id: str,
) -> _tracking.RunSummary:
    """Train each task alone, one ``stl_task`` run each, and log their values to the parent.

    The number of tasks is known once the first run has loaded the data. Each task has its
    own checkpoint folder, ``stl-task-<index>`` in the seed's folder, so a retried trial
    skips the tasks that its failed attempt finished and resumes the one it stopped in.
    """
    seed = context.config.seeds[seed_index]
    spec = run_spec(context, row, str(seed))
    seed_dir = _checkpoint_dir(context, trial, seed)
    summaries: list[_tracking.RunSummary] = []
    n_tasks: int | None = None
    task_index = 0
    while n_tasks is None or task_index < n_tasks:
        run_id = tree.create(parent_run_id, "stl_task", f"stl task {task_index}", spec)
        logger = _epoch_logger(context, run_id, tree, task_index)
        task_dir = None if seed_dir is None else seed_dir / f"stl-task-{task_index}"
        try:
            trainer, _ = train_experiment(
                context.experiment,
                "stl",
                train_config(context, seed, task_dir),
                stl_task=task_index,
                callbacks=[logger, _TaskNamesCallback(context), _StopCheck()],
                resume_from=_resume_path(context, trial, task_dir),
            )
        except BaseException:
            logger.close_after_error()
            raise
        n_tasks = trainer.n_tasks
        tree.finish(run_id)
        assert logger.summary is not None
        summaries.append(logger.summary)
        task_index += 1
    merged = _tracking.merge_stl_summaries(summaries, n_tasks)
    keys = task_keys(context.task_names)
    _tracking.log_stl_seed_summary(context.client, parent_run_id, merged, keys)
    return merged


def train_config(context: WorkerContext, seed: int, checkpoint_dir: Path | None) -> TrainConfig:
    config = context.config
    return TrainConfig(
        n_epochs=config.n_epochs,
        lr=config.lr,
        batch_size=config.batch_size,
        seed=seed,
        device=context.settings.device,
        num_workers=context.settings.num_workers,
        static_weights=config.static_weights,
        checkpoint_dir=checkpoint_dir,
    )


def _checkpoint_dir(context: WorkerContext, trial: optuna.Trial, seed: int) -> Path | None:
    """Return the checkpoint folder of one seed, keyed by the trial's first attempt.

    Every attempt of a retried trial uses the folder of the first attempt, so a retry on
    any worker that uses the same ``--checkpoint-dir`` finds the checkpoints of the failed
    attempt.
    """
    root = context.settings.checkpoint_dir
    if root is None:
        return None
    first_attempt = _retry_history(context, trial)[:1] or [trial.number]
    return root / context.config.name / f"trial-{first_attempt[0]}" / f"seed-{seed}"


def _retry_history(context: WorkerContext, trial: optuna.Trial) -> list[int]:
    """Return the numbers of the earlier attempts of ``trial``, oldest first."""
    system_attrs = context.storage.get_trial(trial._trial_id).system_attrs  # noqa: SLF001
    return list(system_attrs.get(_RETRY_HISTORY, []))


def _resume_path(
    context: WorkerContext, trial: optuna.Trial, checkpoint_dir: Path | None
) -> Path | None:
    """Return the last checkpoint of a failed attempt of ``trial``, None to start at epoch 1.

    Only a retried trial resumes. A first attempt that finds a checkpoint (left by an
    earlier study of the same name) starts at epoch 1 and overwrites it.
    """
    if checkpoint_dir is None:
        return None
    path = checkpoint_dir / CHECKPOINT_NAME
    if not path.is_file():
        return None
    if not _retry_history(context, trial):
        _logger.warning(
            "trial %d: overwriting the checkpoint %s of an earlier study", trial.number, path
        )
        return None
    _logger.info("trial %d resumes from its failed attempt's checkpoint %s", trial.number, path)
    return path


# End of the study.


def finish_study(context: WorkerContext) -> None:
    """Log the report and Optuna's plots to the parent run once every trial has settled.

    The first worker to find the study finished logs them. A study user attribute records
    the number of settled trials of the last report, so a report is logged once per count.
    """
    study, config = context.study, context.config
    with study_lock(context.settings.storage_url, config.name):
        counts = count_trials(study)
        done = counts.settled >= config.n_trials and counts.running == 0
        if not done or study.user_attrs.get(REPORT_TRIALS_ATTR) == counts.settled:
            return
        study.set_user_attr(REPORT_TRIALS_ATTR, counts.settled)
    _logger.info(
        "study %s finished: %d complete, %d pruned, %d failed",
        config.name,
        counts.complete,
        counts.pruned,
        counts.failed,
    )
    _tracking.log_study_artifacts(
        context.client, context.parent_run_id, context.tracking_uri, study
    )
    context.client.set_terminated(context.parent_run_id, _tracking.FINISHED)
