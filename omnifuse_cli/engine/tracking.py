"""Run tracking: a run's settings, epoch curves, cross-validation folds, final scores and files
sent to MLflow or TensorBoard while it runs (``--track mlflow|tensorboard``).

A Tracker is opened by open_tracker, fed through ``on_event`` (it is an on_progress callback)
plus log_params / log_metrics / log_artifacts / set_tags, and finished once; as a context manager
it finishes FINISHED, FAILED on an exception, or KILLED on Ctrl-C. ``child`` opens a nested run
(one per tuning trial). Backend errors propagate: a silently dropped log is worse than a stop.

What the progress events become (metric names as MLflow and TensorBoard show them):
- ``epoch``: every number of EpochRecord.row() but ``epoch`` and ``best`` (train_loss, val_loss,
  val_acc, val_macro_f1, val_auroc, loss_*, tla_*, reliability_*, seconds) at step = the epoch;
  inside a cv fold prefixed ``fold{n}/``, while the final cv model trains ``refit/``;
- ``fold``: fold n starts (n = event.done + 1: cv/run.py emits the count of folds before it);
- ``fold-done``: that fold's test scores as ``fold_<metric>`` (acc, macro_f1, auroc, ...) plus
  ``fold_best_epoch`` at step n = event.done, so one chart per metric shows every fold;
- ``refit``: the prefix becomes ``refit/``; every other kind is ignored.

MLflow writes through MlflowClient (never the fluent API's global active run, since one process
may hold a tuning study's parent run and its children). Without a URI it uses
$MLFLOW_TRACKING_URI, else ``sqlite:///<cwd>/mlflow.db`` (artifacts in ``<cwd>/mlruns``): MLflow
3.18 refuses file stores (``./mlruns``) unless MLFLOW_ALLOW_FILE_STORE=true is set.
"""

from __future__ import annotations

import math
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args

from omnifuse_cli import __version__
from omnifuse_cli.engine import distributed
from omnifuse_cli.engine.events import EventFn, ProgressEvent, ignore
from omnifuse_cli.errors import ConfigError, TrainingInterrupted

if TYPE_CHECKING:  # only annotated: both are optional extras, imported when a tracker opens
    from mlflow.tracking import MlflowClient
    from torch.utils.tensorboard import SummaryWriter

    from omnifuse_cli.engine.cv import FoldResult
    from omnifuse_cli.engine.fitting import EpochRecord

TrackKind = Literal["mlflow", "tensorboard"]
TRACK_KINDS: tuple[str, ...] = get_args(TrackKind)
RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
DEFAULT_EXPERIMENT = "omnifuse"

# Columns of EpochRecord.row() that are not curves: the x axis itself, and a 0/1 flag.
_NOT_CURVES = frozenset({"epoch", "best"})
# What MLflow accepts in a metric or param name (mlflow.utils.validation, colons left out:
# Windows servers refuse them); TLA's combination names hold a "+" ("labs+us").
_MLFLOW_NAME_BAD = re.compile(r"[^\w./\- ]")

_T = TypeVar("_T", bound="Tracker")


def param_text(value: Any) -> str:
    """A setting as a parameter's text: None -> "None", a list or tuple joined by ","."""
    if isinstance(value, (list, tuple)):
        return ",".join(param_text(v) for v in value)
    return str(value)


def epoch_metrics(record: EpochRecord, prefix: str = "") -> dict[str, float]:
    """The numbers of one epoch's row, named ``prefix + column``."""
    return {
        f"{prefix}{name}": float(value)
        for name, value in record.row().items()
        if name not in _NOT_CURVES
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
    }


def fold_metrics(fold: FoldResult) -> dict[str, float]:
    """A finished cv fold's test scores and best epoch, named ``fold_<name>``."""
    out = {f"fold_{name}": float(value) for name, value in fold.metrics.items()}
    out["fold_best_epoch"] = float(fold.best_epoch)
    return out


class Tracker(ABC):
    """One tracked run. ``run_id``: the MLflow run id, or the TensorBoard log dir; ``where``: a
    line saying where to look (for the CLI to print)."""

    run_id: str
    where: str

    def __init__(self, run_id: str, where: str) -> None:
        self.run_id = run_id
        self.where = where
        self._prefix = ""  # fold{n}/ inside a cv fold, refit/ for cv's final model
        self._finished = False

    @abstractmethod
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Settings, each value as text (param_text). MLflow refuses a second, different value
        for a name it already holds."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Numbers at ``step``; without a step they are the run's final scores. NaN and
        infinite values are left out (an AUROC undefined on a small split)."""
        finite = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
        if finite:
            self._log_metrics(finite, step)

    @abstractmethod
    def _log_metrics(self, metrics: dict[str, float], step: int | None) -> None: ...

    @abstractmethod
    def log_artifacts(self, paths: Sequence[Path]) -> None:
        """Files, and folders (each kept under its own name)."""

    @abstractmethod
    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    @abstractmethod
    def child(self, name: str) -> Tracker:
        """A nested run named ``name`` (a tuning trial)."""

    def on_event(self, event: ProgressEvent) -> None:
        """Log what a progress event carries (the module docstring lists the names)."""
        if event.kind == "fold":
            self._prefix = f"fold{event.done + 1}/"
        elif event.kind == "refit":
            self._prefix = "refit/"
        elif event.kind == "epoch" and event.record is not None:
            self.log_metrics(epoch_metrics(event.record, self._prefix), step=event.record.epoch)
        elif event.kind == "fold-done" and event.fold is not None:
            self.log_metrics(fold_metrics(event.fold), step=event.done)

    def finish(self, status: RunStatus = "FINISHED") -> None:
        """End the run with ``status``; a second call does nothing."""
        if self._finished:
            return
        self._finished = True
        self._finish(status)

    @abstractmethod
    def _finish(self, status: RunStatus) -> None: ...

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, (KeyboardInterrupt, TrainingInterrupted)):
            self.finish("KILLED")
        else:
            self.finish("FAILED")


def open_tracker(
    kind: str,
    *,
    uri: str | None,
    run_name: str,
    out_dir: Path,
    experiment: str = DEFAULT_EXPERIMENT,
) -> Tracker:
    """Start a tracked run named ``run_name`` for the run folder ``out_dir``.

    ``kind``: "mlflow" (``uri``: a tracking URI; None: $MLFLOW_TRACKING_URI or
    default_mlflow_uri()) or "tensorboard" (``uri``: the log dir; None: out_dir/tensorboard).
    Raises ConfigError for an unknown kind or a missing optional extra."""
    if kind == "mlflow":
        return MlflowTracker.open(uri, run_name=run_name, out_dir=out_dir, experiment=experiment)
    if kind == "tensorboard":
        return TensorBoardTracker.open(uri, run_name=run_name, out_dir=out_dir)
    raise ConfigError(
        f"unknown tracker {kind!r}: choose one of {', '.join(TRACK_KINDS)}",
        hint="--track mlflow or --track tensorboard",
    )


def default_mlflow_uri() -> str:
    """``sqlite:///<cwd>/mlflow.db``, absolute: a local database beside MLflow's own default
    artifact folder ``./mlruns``."""
    return "sqlite:///" + (Path.cwd() / "mlflow.db").as_posix()


def _base_tags(out_dir: Path) -> dict[str, str]:
    return {"omnifuse.version": __version__, "omnifuse.out_dir": str(out_dir)}


def _mlflow_name(name: str) -> str:
    return _MLFLOW_NAME_BAD.sub("_", name)


class MlflowTracker(Tracker):
    """A run in an MLflow experiment, written through one MlflowClient."""

    def __init__(
        self, client: MlflowClient, run_id: str, experiment_id: str, where: str, out_dir: Path
    ) -> None:
        super().__init__(run_id, where)
        self._client = client
        self._experiment_id = experiment_id
        self._out_dir = out_dir

    @classmethod
    def open(
        cls, uri: str | None, *, run_name: str, out_dir: Path, experiment: str
    ) -> MlflowTracker:
        try:  # optional extra: imported only when tracking to MLflow
            import mlflow
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ConfigError(
                "--track mlflow needs MLflow, which is not installed",
                hint="pip install 'omnifuse[mlflow]'",
            ) from exc
        tracking_uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_mlflow_uri()
        try:
            client = MlflowClient(tracking_uri=tracking_uri)
        except MlflowException as exc:
            if "MLFLOW_ALLOW_FILE_STORE" not in str(exc):
                raise
            raise ConfigError(
                f"MLflow {mlflow.__version__} no longer tracks to a folder ({tracking_uri})",
                hint="give a database, e.g. --track-uri sqlite:///mlflow.db, "
                "or set MLFLOW_ALLOW_FILE_STORE=true",
            ) from exc
        experiment_id = _experiment_id(client, experiment, _artifact_root(tracking_uri, experiment))
        tags = {**_base_tags(out_dir), "mlflow.runName": run_name}
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        run_id = run.info.run_id
        return cls(
            client, run_id, experiment_id, _mlflow_where(client, experiment_id, run_id), out_dir
        )

    def log_params(self, params: Mapping[str, Any]) -> None:
        # optional extra: imported only when tracking to MLflow (already loaded by open)
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        self._client.log_batch(
            self.run_id,
            params=[
                Param(_mlflow_name(k), _truncate(param_text(v), MAX_PARAM_VAL_LENGTH))
                for k, v in params.items()
            ],
        )

    def _log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        # optional extra: imported only when tracking to MLflow (already loaded by open)
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(
            self.run_id,
            metrics=[Metric(_mlflow_name(k), v, now, step or 0) for k, v in metrics.items()],
        )

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        for path in paths:
            if path.is_dir():
                self._client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            elif path.is_file():
                self._client.log_artifact(self.run_id, str(path))
            else:
                raise FileNotFoundError(f"no file or folder {path} to log as an artifact")

    def set_tags(self, tags: Mapping[str, str]) -> None:
        # optional extra: imported only when tracking to MLflow (already loaded by open)
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def child(self, name: str) -> Tracker:
        tags = {
            **_base_tags(self._out_dir),
            "mlflow.runName": name,
            "mlflow.parentRunId": self.run_id,
        }
        run = self._client.create_run(self._experiment_id, run_name=name, tags=tags)
        run_id = run.info.run_id
        where = _mlflow_where(self._client, self._experiment_id, run_id)
        return MlflowTracker(self._client, run_id, self._experiment_id, where, self._out_dir)

    def _finish(self, status: RunStatus) -> None:
        self._client.set_terminated(self.run_id, status)


def _artifact_root(tracking_uri: str, experiment: str) -> str | None:
    """Files of a new experiment tracked to a local SQLite database go beside the database
    (``mlruns/EXPERIMENT/RUN_ID/artifacts`` in its folder), not into whatever folder the command
    ran from (MLflow's default); other stores keep MLflow's choice."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    database = Path(tracking_uri[len(prefix) :])
    return (database.absolute().parent / "mlruns" / _mlflow_name(experiment)).as_uri()


def _experiment_id(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    """The id of experiment ``name``, created when absent (another process may create it at the
    same moment: then create fails and the second look finds theirs)."""
    # optional extra: imported only when tracking to MLflow (already loaded by open)
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_root)
        except MlflowException:
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        raise ConfigError(
            f"the MLflow experiment {name!r} was deleted",
            hint=f"restore it: mlflow experiments restore --experiment-id {found.experiment_id}",
        )
    return str(found.experiment_id)


def _mlflow_where(client: MlflowClient, experiment_id: str, run_id: str) -> str:
    uri = client.tracking_uri
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{uri} (experiment {experiment_id}, run {run_id})"


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# What TensorBoard's hparams dashboard takes as a value; anything else goes as text.
HParam = bool | int | float | str


class TensorBoardTracker(Tracker):
    """A TensorBoard log dir. TensorBoard has no artifact store or tags: their paths and values
    go in as text; the settings and final scores go to the hparams dashboard when it finishes."""

    def __init__(self, writer: SummaryWriter, log_dir: str, run_name: str, out_dir: Path) -> None:
        super().__init__(log_dir, log_dir)
        self._writer = writer
        self._out_dir = out_dir
        self._params: dict[str, HParam] = {}
        self._final: dict[str, float] = {}
        self._tags: dict[str, str] = {}
        self._artifacts: list[str] = []
        self._texts: dict[str, int] = {}  # the step of each text's next version
        self.set_tags({**_base_tags(out_dir), "omnifuse.run_name": run_name})

    @classmethod
    def open(cls, uri: str | None, *, run_name: str, out_dir: Path) -> TensorBoardTracker:
        log_dir = uri or str(out_dir / "tensorboard")
        return cls(_summary_writer(log_dir), log_dir, run_name, out_dir)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._params.update({k: _hparam(v) for k, v in params.items()})
        rows = {k: param_text(v) for k, v in self._params.items()}
        self._text("settings", _markdown_table(("setting", "value"), rows))

    def _log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        if step is None:  # written with the hparams when the run finishes
            self._final.update(metrics)
            return
        for tag, value in metrics.items():
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()  # an epoch's curves show up in a live TensorBoard at once

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        self._artifacts += [str(p.resolve()) for p in paths]
        self._text("artifacts", "\n".join(f"- `{p}`" for p in self._artifacts))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._tags.update({k: str(v) for k, v in tags.items()})
        self._text("tags", _markdown_table(("tag", "value"), self._tags))

    def child(self, name: str) -> Tracker:
        log_dir = os.path.join(self.run_id, name)
        return TensorBoardTracker(_summary_writer(log_dir), log_dir, name, self._out_dir)

    def _text(self, tag: str, text: str) -> None:
        step = self._texts.get(tag, 0)
        self._writer.add_text(tag, text, global_step=step)
        self._texts[tag] = step + 1

    def _finish(self, status: RunStatus) -> None:
        # run_name=".": into this log dir itself, not add_hparams' default timestamped subfolder
        # (a second run in TensorBoard's list). It writes the final scores as scalars too.
        hparams = {**self._params, "status": status}
        self._writer.add_hparams(hparams, dict(self._final), run_name=".")
        self._writer.close()


def _summary_writer(log_dir: str) -> SummaryWriter:
    try:  # optional extra: imported only when tracking to TensorBoard
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError(
            "--track tensorboard needs TensorBoard, which is not installed",
            hint="pip install 'omnifuse[tensorboard]'",
        ) from exc
    return SummaryWriter(log_dir=log_dir)


def _hparam(value: Any) -> HParam:
    return value if isinstance(value, (bool, int, float, str)) else param_text(value)


def _markdown_table(header: tuple[str, str], rows: Mapping[str, str]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {cell(k)} | {cell(v)} |" for k, v in rows.items()]
    return "\n".join(lines)


@contextmanager
def tracked(
    kind: str | None,
    uri: str | None,
    *,
    run_name: str,
    out_dir: Path,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    on_progress: EventFn | None,
) -> Iterator[tuple[Tracker | None, EventFn]]:
    """(tracker, on_progress): with ``kind`` a tracker that receives ``params``, ``tags`` and
    every progress event before ``on_progress`` does, finished when the block ends (FAILED or
    KILLED when it raises); without ``kind`` (or on a torchrun rank other than 0) no tracker,
    and the callback unchanged."""
    user = on_progress or ignore
    if not kind or not distributed.is_main():
        yield None, user
        return
    with open_tracker(kind, uri=uri, run_name=run_name, out_dir=out_dir) as tracker:
        tracker.log_params(params)
        tracker.set_tags(tags)

        def both(event: ProgressEvent) -> None:
            tracker.on_event(event)
            user(event)

        yield tracker, both


def log_results(tracker: Tracker, metrics: Mapping[str, float], files: Sequence[Path]) -> None:
    """A run's final scores (no step) and its files (those that exist)."""
    tracker.log_metrics(metrics)
    tracker.log_artifacts([f for f in files if f.exists()])
