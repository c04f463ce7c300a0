"""What the report of a tune folder (`omnifuse tune`) shows, read from its files: tune.json,
trials.csv, intermediate.csv, best.json/.yaml, meta.csv, the nested estimate (nested.csv/.json)
and the refit run (refit/, read as any run). The study's storage is opened only for parameter
importances; everything else comes from the files, so a copied folder, or one whose database
cannot be reached, still reports. optuna is imported inside the functions that need it (heavy,
and off every other report's path)."""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from omnifuse_cli.engine import runs
from omnifuse_cli.errors import BundleError, OmnifuseError
from omnifuse_cli.report.inputs import ReportInputs, load_inputs
from omnifuse_cli.report.result_csv import read_result_csv
from omnifuse_cli.report.tuning import Nested, Tuning

# The tune folder's files (engine/runs.py names them for omnifuse_cli/tuning and the report).
TUNE_FILE = runs.TUNE_JSON
TRIALS = runs.TRIALS_CSV
INTERMEDIATE = runs.INTERMEDIATE_CSV
BEST_JSON = runs.BEST_JSON
BEST_YAML = runs.BEST_YAML
NESTED = runs.NESTED_CSV
NESTED_JSON = runs.NESTED_JSON
REFIT_DIR = runs.REFIT_DIR
PARAM = "param_"  # trials.csv's column prefix of a searched setting
TEXT_COLUMNS = ("state", "datetime_start", "datetime_complete", "run_dir", "params", "error")


@dataclass
class TuneInputs:
    source: Path
    request: dict[str, Any]  # tune.json
    meta: dict[str, str]  # meta.csv ({} while the search runs)
    trials: pd.DataFrame  # trials.csv, by trial number; value NaN when none
    intermediate: pd.DataFrame | None  # number, step, value
    best: dict[str, Any] | None  # best.json (number, value, params, settings)
    best_yaml: str  # best.yaml's text ("" when absent)
    tuning: Tuning
    model: ReportInputs  # the refit run's inputs, or a stand-in of kind "tune" for the checklist
    refit: bool  # model is the refit run
    nested: pd.DataFrame | None = None
    importances: dict[str, float] | None = None
    study_opened: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return str(self.request.get("metric", "?"))

    @property
    def maximize(self) -> bool:
        return self.request.get("direction", "maximize") != "minimize"

    @property
    def params(self) -> list[str]:
        """The searched settings: the space's order, then any other param_ column."""
        found = [c.removeprefix(PARAM) for c in self.trials.columns if c.startswith(PARAM)]
        space = list(self.request.get("space", {}))
        return [p for p in space if p in found] + [p for p in found if p not in space]

    def count(self, state: str) -> int:
        return int((self.trials["state"] == state).sum())


def is_tune_folder(source: Path) -> bool:
    """A folder with a tune.json of kind "tune"."""
    path = Path(source) / TUNE_FILE
    if not path.is_file():
        return False
    try:
        request = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(
            f"{path} is not valid JSON ({err})", hint="pass a folder written by omnifuse tune"
        ) from err
    return isinstance(request, dict) and request.get("kind") == "tune"


def best_so_far(values: np.ndarray, maximize: bool) -> np.ndarray:
    """The best objective value among the trials up to each one (NaN: no value, skipped)."""
    values = np.asarray(values, dtype=float)
    filled = np.where(np.isnan(values), -np.inf if maximize else np.inf, values)
    best = np.maximum.accumulate(filled) if maximize else np.minimum.accumulate(filled)
    return np.where(np.isinf(best), np.nan, best)


def best_trial(trials: pd.DataFrame, maximize: bool) -> int | None:
    """The complete trial with the best value (the lowest number on a tie)."""
    done = trials[(trials["state"] == "COMPLETE") & trials["value"].notna()]
    if not len(done):
        return None
    values = done["value"].to_numpy(dtype=float)
    k = int(np.argmax(values) if maximize else np.argmin(values))
    return int(done["number"].iloc[k])


def hide_password(url: str) -> str:
    """A storage URL as the page may show it: user:password@ becomes user:***@."""
    return re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", url)


def load_tune(source: Path) -> TuneInputs:
    source = Path(source)
    request = json.loads((source / TUNE_FILE).read_text(encoding="utf-8"))
    if not (source / TRIALS).is_file():
        raise BundleError(
            f"the search in {source} has no trials yet (no {TRIALS})",
            hint="report it once omnifuse tune has finished a trial",
        )
    trials = read_result_csv(source / TRIALS, TEXT_COLUMNS)
    trials["value"] = pd.to_numeric(trials["value"], errors="coerce")
    trials = trials.sort_values("number").reset_index(drop=True)
    notes: list[str] = []
    meta = runs.read_key_values(source / runs.META)
    if not meta:
        notes.append(
            f"the search has not finished (no {runs.META}): this page shows the {len(trials)} "
            "trials so far"
        )
    intermediate = (
        read_result_csv(source / INTERMEDIATE) if (source / INTERMEDIATE).is_file() else None
    )
    maximize = request.get("direction", "maximize") != "minimize"
    best = (
        json.loads((source / BEST_JSON).read_text(encoding="utf-8"))
        if (source / BEST_JSON).is_file()
        else None
    )
    if best is None and (number := best_trial(trials, maximize)) is not None:
        row = trials[trials["number"] == number].iloc[0]
        best = {"number": number, "value": float(row["value"]), "params": {}, "settings": {}}
    best_yaml = (
        (source / BEST_YAML).read_text(encoding="utf-8") if (source / BEST_YAML).is_file() else ""
    )
    nested, nested_summary = _nested(source, notes)
    refit = _refit(source, notes)
    complete = int((trials["state"] == "COMPLETE").sum())
    tuning = Tuning(
        study=str(request.get("study_name", "?")),
        trials=len(trials),
        complete=complete,
        pruned=int((trials["state"] == "PRUNED").sum()),
        metric=str(request.get("metric", "?")),
        objective=str(request.get("objective", "validation")),
        folds=int(request.get("folds", 0) or 0),
        sampler=str(request.get("sampler", "?")),
        space=dict(request.get("space", {})),
        best_value=float(best["value"]) if best is not None else math.nan,
        n_pool=str(request.get("n_pool", "?")),
        n_test=str(request.get("n_test", "?")),
        folder=str(source),
        best_number=int(best["number"]) if best is not None else None,
        nested=nested_summary,
    )
    model = refit if refit is not None else _stand_in(source, request, meta)
    model.tuning = tuning
    tune = TuneInputs(
        source=source,
        request=request,
        meta=meta,
        trials=trials,
        intermediate=intermediate,
        best=best,
        best_yaml=best_yaml,
        tuning=tuning,
        model=model,
        refit=refit is not None,
        nested=nested,
        notes=notes,
    )
    _importances(tune)
    return tune


def _nested(source: Path, notes: list[str]) -> tuple[pd.DataFrame | None, Nested | None]:
    if not (source / NESTED_JSON).is_file():
        return None, None
    summary = json.loads((source / NESTED_JSON).read_text(encoding="utf-8"))
    frame = read_result_csv(source / NESTED, TEXT_COLUMNS) if (source / NESTED).is_file() else None
    if frame is None:
        notes.append(f"{NESTED_JSON} without {NESTED}: the outer folds are not shown")
    return frame, Nested(
        folds=int(summary.get("folds", 0)),
        metric=str(summary.get("metric", "?")),
        outer_mean=float(summary.get("outer_mean", math.nan)),
        outer_ci_low=float(summary.get("outer_ci_low", math.nan)),
        outer_ci_high=float(summary.get("outer_ci_high", math.nan)),
        inner_mean=float(summary.get("inner_mean", math.nan)),
    )


def _refit(source: Path, notes: list[str]) -> ReportInputs | None:
    folder = source / REFIT_DIR
    if not folder.is_dir():
        return None
    try:
        return load_inputs(folder)
    except OmnifuseError as err:
        notes.append(f"the refit run in {folder} cannot be read: {err.message}")
        return None


def _stand_in(source: Path, request: dict[str, Any], meta: dict[str, str]) -> ReportInputs:
    """What the checklist knows without a refit run: the data and the search, no model."""
    num_classes = int(request.get("num_classes", 2))
    pool, test = request.get("n_pool"), request.get("n_test")
    facts = {
        "manifest": str(request.get("manifest", "?")),
        "seed": str(request.get("seed", "?")),
        "version_omnifuse": meta.get("version_omnifuse", str(request.get("version", "?"))),
    }
    if isinstance(pool, int) and isinstance(test, int):
        facts["n_patients"] = str(pool + test)
    return ReportInputs(
        kind="tune",
        source=source,
        meta=facts,
        class_names=[str(c) for c in range(num_classes)],
        modalities=[],
        cohort=None,
        group_name="split",
        metrics=pd.DataFrame(columns=["metric", "value", "ci_low", "ci_high"]),
        evaluated_on="no model (the search was not refitted)",
        predictions=None,
        confusion=None,
        patterns=None,
        curves={},
    )


def _storage(source: Path, url: str, notes: list[str]) -> str | None:
    """The storage URL to open, or None (and a note) when it cannot be. A SQLite file that is
    not there is never opened (that would create an empty database); a copied folder's own copy
    of it (same file name, in the folder) is used instead."""
    if not url.startswith("sqlite:"):
        return url
    path = Path(url.split(":///", 1)[-1]) if ":///" in url else None
    if path is None or path.is_file():
        return url
    local = source / path.name
    if local.is_file():
        notes.append(f"the study's database {path} is not on this machine: read {local}")
        return f"sqlite:///{local.resolve()}"
    notes.append(f"the study's database {path} does not exist")
    return None


def _importances(tune: TuneInputs) -> None:
    """Parameter importances by optuna (its default evaluator) when the study opens and two or
    more complete trials differ in a setting; otherwise a note says why there are none."""
    url = str(tune.request.get("storage", ""))
    name = str(tune.request.get("study_name", ""))
    target = _storage(tune.source, url, tune.notes)
    fallback = (
        f"figures and tables come from {TRIALS} and {INTERMEDIATE}; parameter importances are "
        "omitted"
    )
    if target is None:
        tune.notes[-1] += f": {fallback}"
        return
    try:
        study = _open_study(name, target)
    # Any failure of a storage (driver missing, host unreachable, schema of another optuna,
    # study absent) leaves the report to the files: a page is always written.
    except Exception as err:
        first_line = (str(err).splitlines() or [""])[0]
        tune.notes.append(
            f"the study {name} could not be opened from {hide_password(url)} "
            f"({type(err).__name__}: {hide_password(first_line)}): {fallback}"
        )
        return
    tune.study_opened = True
    # optuna is loaded by _open_study; its trial states are needed to count the trials.
    from optuna.trial import TrialState

    stored = study.get_trials(deepcopy=False)
    complete = [t for t in stored if t.state == TrialState.COMPLETE]
    if len(complete) != tune.tuning.complete:
        tune.notes.append(
            f"the study holds {len(complete)} complete trials, {TRIALS} "
            f"{tune.tuning.complete}: the search went on after {TRIALS} was written "
            "(importances use the study's trials)"
        )
    names = {name for t in complete for name in t.params}
    varying = [n for n in names if len({repr(t.params.get(n)) for t in complete}) > 1]
    if len(complete) < 2 or not varying:
        tune.notes.append(
            "parameter importances need at least 2 complete trials that differ in a setting "
            f"({len(complete)} complete here): omitted"
        )
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # optuna again (loaded above): the evaluator is optuna's default.
        from optuna.importance import get_param_importances

        importances = get_param_importances(study)
    tune.importances = {k: float(v) for k, v in importances.items()}
    for warning in caught:
        if "importance" in str(warning.message).lower():
            tune.notes.append(f"optuna on the importances: {warning.message}")


def _open_study(name: str, url: str) -> Any:
    """The study, read-only in spirit: a network database gets a 5 s connection timeout."""
    # Heavy, and only a tune folder's report needs it.
    import optuna

    kwargs: dict[str, Any] = {}
    if url.startswith(("postgresql", "mysql")):
        kwargs["engine_kwargs"] = {"connect_args": {"connect_timeout": 5}}
    storage = optuna.storages.RDBStorage(url, **kwargs)
    return optuna.load_study(study_name=name, storage=storage)
