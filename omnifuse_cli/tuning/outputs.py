"""What a tune leaves in its folder: the trials table (trials.csv, intermediate.csv), the best
trial (best.json, and best.yaml: a --config file for `omnifuse train`) and meta.csv, all read
from the study, so whichever process writes them describes every process's trials."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from omnifuse_cli import __version__
from omnifuse_cli.engine.files import write_csv, write_text_atomic
from omnifuse_cli.engine.runs import write_meta
from omnifuse_cli.settings import run_config_yaml, with_preset
from omnifuse_cli.tuning import study as studies
from omnifuse_cli.tuning.request import (
    BEST_JSON,
    BEST_YAML,
    INTERMEDIATE_CSV,
    TRIALS_CSV,
    TuneRequest,
)

if TYPE_CHECKING:  # only for annotations: optuna is imported when a study opens
    import optuna


@dataclass
class TuneResult:
    out_dir: Path
    study_name: str
    storage: str
    counts: dict[str, int]  # trials by state (complete, pruned, fail, running, waiting, ...)
    ran: int  # trials this process ran
    best_number: int | None
    best_value: float | None
    best_settings: dict[str, Any]  # every setting of the best trial that is not the default
    trials: pd.DataFrame
    refit_dir: Path | None = None
    refit_test: dict[str, float] = field(default_factory=dict)
    nested: pd.DataFrame | None = None
    nested_summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def trials_table(study: optuna.Study, out_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, intermediate): one row per trial (interrupted ones, rerun under another
    number, left out) and one per reported epoch score."""
    rows: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    names: list[str] = []
    rerun = studies.interrupted(study)
    for t in study.get_trials(deepcopy=False):
        if t.number in rerun:
            continue
        for name in t.params:
            if name not in names:
                names.append(name)
        done = t.datetime_complete
        start = t.datetime_start
        run_dir = str(t.user_attrs.get("run_dir", ""))
        if run_dir:
            try:
                run_dir = Path(run_dir).relative_to(out_dir.absolute()).as_posix()
            except ValueError:  # another process's folder
                pass
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "duration_s": (done - start).total_seconds() if done and start else None,
                "datetime_start": start.isoformat(timespec="seconds") if start else "",
                "datetime_complete": done.isoformat(timespec="seconds") if done else "",
                "last_step": max(t.intermediate_values) if t.intermediate_values else None,
                **{f"param_{k}": v for k, v in t.params.items()},
                "error": t.user_attrs.get("error", ""),
                "run_dir": run_dir,
            }
        )
        steps += [
            {"number": t.number, "step": s, "value": v}
            for s, v in sorted(t.intermediate_values.items())
        ]
    order = ["number", "state", "value", "duration_s", "datetime_start", "datetime_complete"]
    order += ["last_step"] + [f"param_{n}" for n in names] + ["error", "run_dir"]
    trials = pd.DataFrame(rows, columns=order)
    return trials, pd.DataFrame(steps, columns=["number", "step", "value"])


def write_outputs(
    request: TuneRequest, study: optuna.Study, ran: int, seconds: float
) -> TuneResult:
    out = request.out_dir
    trials, steps = trials_table(study, out)
    write_csv(out / TRIALS_CSV, trials)
    write_csv(out / INTERMEDIATE_CSV, steps)
    counts = studies.counts(study)
    result = TuneResult(
        out_dir=out,
        study_name=request.name,
        storage=request.storage_url,
        counts=counts,
        ran=ran,
        best_number=None,
        best_value=None,
        best_settings={},
        trials=trials,
    )
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if complete:
        best = study.best_trial
        settings = json.loads(best.user_attrs.get("settings", "{}"))
        result.best_number, result.best_value = best.number, float(best.value or math.nan)
        result.best_settings = settings
        best_data = {
            "number": best.number,
            "value": best.value,
            "metric": request.metric,
            "params": best.params,
            "settings": settings,
        }
        write_text_atomic(out / BEST_JSON, json.dumps(best_data, indent=2, default=str) + "\n")
        write_text_atomic(
            out / BEST_YAML,
            f"# omnifuse tune: trial {best.number} of study {request.name!r}, "
            f"{request.metric} {best.value:.4f} on {request.objective}\n"
            + run_config_yaml(
                "train",
                [("manifest", request.manifest), ("num-classes", request.num_classes)],
                with_preset(settings),
            ),
        )
    else:
        result.notes.append("no trial completed: no best settings yet")
    if counts["running"] or counts["waiting"]:
        result.notes.append(
            f"{counts['running']} trial(s) still running and {counts['waiting']} waiting in "
            "other processes: the tables are complete when the last process ends"
        )
    write_meta(
        out,
        {
            "version_omnifuse": __version__,
            "finished": datetime.now().isoformat(timespec="seconds"),
            "seconds": f"{seconds:.1f}",
            "study": request.name,
            "storage": request.storage_url,
            "metric": request.metric,
            "objective": "cv" if request.folds else "validation",
            "folds": request.folds,
            "n_complete": counts["complete"],
            "n_pruned": counts["pruned"],
            "n_failed": counts["fail"],
            "n_interrupted": counts["interrupted"],
            "n_running": counts["running"],
            "best_trial": "" if result.best_number is None else result.best_number,
            "best_value": "" if result.best_value is None else result.best_value,
            "trials_this_process": ran,
        },
    )
    return result
