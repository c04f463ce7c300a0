"""The Optuna study behind `omnifuse tune run`, shared by every process that names it.

A study holds a fixed number of trials. The process that creates it enqueues them all as
WAITING trials; every process (this one, another started with the same ``--study-name`` and
``--storage``, on this machine or another) claims WAITING trials one at a time by moving one to
RUNNING, which the storage lets exactly one process do. So N trials run exactly once between
however many processes, and nobody runs an (N+1)-th. A trial interrupted by Ctrl-C is marked
failed and a WAITING copy with the same parameters takes its place, so rerunning the command
completes the study; a process killed outright stops sending heartbeats and the next process to
start fails its trial the same way (Optuna's heartbeat, ``HEARTBEAT_SECONDS``).
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, cast

from omnifuse_cli.errors import ConfigError

if TYPE_CHECKING:  # only for annotations: optuna is imported by the functions that use it
    import optuna

Direction = Literal["minimize", "maximize"]
HEARTBEAT_SECONDS = 60  # a RUNNING trial without a heartbeat for GRACE_SECONDS is failed
GRACE_SECONDS = 180
TARGET = "omnifuse_trials"  # study user attribute: the number of trials the study holds
SIGNATURE = "omnifuse_search"  # study user attribute: what every process must search alike
# Trial user attribute of a queued copy: the number of the trial it reruns (interrupted by Ctrl-C
# or lost with its process). The copy carries it because a finished trial cannot be changed.
RETRY_OF = "omnifuse_retry_of"
WAIT_FOR_CREATOR_SECONDS = 60.0


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage (SQLite, PostgreSQL, MySQL: any SQLAlchemy URL) with heartbeats; SQLite
    waits for a lock instead of failing while another process writes."""
    import optuna  # ~0.5 s of SQLAlchemy: only when a study is opened

    # Optuna's INFO lines (a study created, each trial's value) would print from below the CLI;
    # the CLI shows trials itself.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    try:
        with warnings.catch_warnings():  # heartbeats: "experimental" since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=GRACE_SECONDS,
                heartbeat_stale_trial_callback=_replace_failed,
                **kwargs,
            )
    except Exception as err:  # SQLAlchemy's many errors: a bad URL, a missing driver, no server
        raise ConfigError(
            f"cannot open the study storage {url}: {type(err).__name__}: {err}",
            hint="--storage takes an SQLAlchemy URL, e.g. sqlite:///runs/tune/study.db or "
            "postgresql://user:password@host/db (with its driver installed)",
        ) from None


def open_study(
    storage: optuna.storages.RDBStorage,
    name: str,
    *,
    direction: str,
    trials: int,
    signature: Mapping[str, Any],
) -> tuple[optuna.Study, bool]:
    """(study, created): the named study, created with ``trials`` WAITING trials when it does not
    exist. Joining a study checks that it searches the same thing (``signature``); a larger
    ``trials`` than the study holds adds the difference."""
    import optuna  # only when a study is opened (see open_storage)

    try:
        study = optuna.create_study(
            storage=storage, study_name=name, direction=cast(Direction, direction)
        )
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=name)
        created = False
    if created:
        study.set_user_attr(SIGNATURE, json.dumps(signature, sort_keys=True, default=str))
        _enqueue(study, trials)
        study.set_user_attr(TARGET, trials)  # last: joiners wait for it
        return study, True
    _wait_for_creator(study, name)
    theirs = json.loads(study.user_attrs[SIGNATURE])
    mine = json.loads(json.dumps(signature, sort_keys=True, default=str))
    differs = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
    if differs:
        key = differs[0]
        raise ConfigError(
            f"study {name!r} in this storage searches something else: {key} is "
            f"{theirs.get(key)!r} there, {mine.get(key)!r} here",
            hint="give the same manifest, metric, folds and search space as the process that "
            "started it, or another --study-name",
        )
    if study.direction.name.lower() != direction:
        raise ConfigError(f"study {name!r} is {study.direction.name.lower()}d, not {direction}d")
    target = int(study.user_attrs[TARGET])
    if trials > target:
        _enqueue(study, trials - target)
        study.set_user_attr(TARGET, trials)
    return study, False


def _wait_for_creator(study: optuna.Study, name: str) -> None:
    """A process that joins a study another one is still filling waits until its trials exist."""
    deadline = time.monotonic() + WAIT_FOR_CREATOR_SECONDS
    while TARGET not in study.user_attrs:
        if time.monotonic() > deadline:
            raise ConfigError(
                f"study {name!r} exists but was never set up by omnifuse tune (no "
                f"{TARGET} attribute after {WAIT_FOR_CREATOR_SECONDS:.0f} s)",
                hint="give another --study-name",
            )
        time.sleep(0.5)


def _enqueue(study: optuna.Study, n: int, params: Mapping[str, Any] | None = None) -> None:
    for _ in range(n):
        study.enqueue_trial(dict(params or {}))


def _replace_failed(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Optuna's callback for a trial whose process died (no heartbeat): run it again. (Optuna
    hands the callback the study alone; its storage is the study's.)"""
    requeue(study, trial.number, trial.params)


def requeue(study: optuna.Study, number: int, params: Mapping[str, Any]) -> None:
    """Queue a WAITING copy of an interrupted trial, with its parameters."""
    study.enqueue_trial(dict(params), user_attrs={RETRY_OF: number})


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The study's own storage object: Optuna wraps an RDB storage in a cache, and a trial must
    be claimed, told and beaten through the same object that listed it."""
    return study._storage


def claim(study: optuna.Study, rdb: optuna.storages.RDBStorage) -> int | None:
    """The id of a WAITING trial this process now owns (moved to RUNNING), or None when the
    study has none left.

    The move is one conditional UPDATE (``... WHERE state = 'WAITING'``), which the database
    applies for exactly one caller. Optuna's own set_trial_state_values reads the state, then
    writes it: under SQLite (no row locks) two processes can both read WAITING and both run the
    trial, which tests/test_tune.py caught. The table and column names are Optuna's schema."""
    import optuna  # only when a study is opened (see open_storage)
    import sqlalchemy  # Optuna's own dependency

    update = sqlalchemy.text(
        "UPDATE trials SET state = 'RUNNING', datetime_start = :now "
        "WHERE trial_id = :trial_id AND state = 'WAITING'"
    )
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    for frozen in sorted(waiting, key=lambda t: t.number):
        trial_id = frozen._trial_id  # FrozenTrial keeps the storage id private
        with rdb.engine.begin() as connection:
            taken = connection.execute(update, {"now": datetime.now(), "trial_id": trial_id})
        if taken.rowcount == 1:
            return trial_id
    return None


def fail_stale(study: optuna.Study) -> None:
    """Fail (and requeue, through the storage's callback) trials whose process stopped sending
    heartbeats: a machine that died mid-trial."""
    import optuna  # only when a study is opened (see open_storage)

    with warnings.catch_warnings():  # experimental since Optuna 2.9, unchanged since
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


@contextmanager
def heartbeat(storage: optuna.storages.BaseStorage, trial_id: int) -> Iterator[None]:
    """Send the trial's heartbeat every HEARTBEAT_SECONDS while the block runs."""
    # RDB storages and Optuna's cache around them implement its (private) heartbeat base class.
    record: Callable[[int], None] = storage.record_heartbeat  # type: ignore[attr-defined]
    stop = threading.Event()

    def beat() -> None:
        while True:
            record(trial_id)
            if stop.wait(HEARTBEAT_SECONDS):
                return

    thread = threading.Thread(target=beat, name=f"omnifuse-heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def interrupted(study: optuna.Study) -> set[int]:
    """Numbers of the trials that were interrupted and queued again."""
    return {
        int(t.user_attrs[RETRY_OF])
        for t in study.get_trials(deepcopy=False)
        if RETRY_OF in t.user_attrs
    }


def counts(study: optuna.Study) -> dict[str, int]:
    """Trials by state (lower case), interrupted-and-requeued trials apart as ``interrupted``."""
    out = {"complete": 0, "pruned": 0, "fail": 0, "running": 0, "waiting": 0, "interrupted": 0}
    rerun = interrupted(study)
    for trial in study.get_trials(deepcopy=False):
        if trial.number in rerun:
            out["interrupted"] += 1
        else:
            out[trial.state.name.lower()] += 1
    return out
