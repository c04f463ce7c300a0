"""The sections of a tune folder's report: the search in numbers, which score is which (the best
trial's optimistic score against the held-out and nested estimates), its figures, the trials, the
best settings, the refit run, the nested estimate and the TRIPOD+AI checklist."""

from __future__ import annotations

import json
import math
from typing import Any

from omnifuse_cli.report import figures_tune, sections_run
from omnifuse_cli.report.markup import (
    METRIC_LABELS,
    AddFigure,
    ci_range,
    esc,
    metrics_table,
    num,
    table,
)
from omnifuse_cli.report.tune_inputs import PARAM, TRIALS, TuneInputs, hide_password
from omnifuse_cli.report.tuning import METRIC_WORDS, RUN_METRIC

REFIT_METRICS = ("acc", "macro_f1", "balanced_acc", "auroc", "auprc", "loss")
NESTED_SCORES = ("outer_auroc", "outer_macro_f1", "outer_log_loss")


def sections(tune: TuneInputs, add: AddFigure) -> list[tuple[str, str, str]]:
    """(id, title, html) of every section, in page order."""
    out = [
        ("summary", "Search", summary(tune)),
        ("numbers", "Which number is which", numbers(tune)),
        ("history", "Optimisation history", history(tune, add)),
        ("importance", "Parameter importances", importance(tune, add)),
        ("slices", "Slices", slices(tune, add)),
        ("trials", "Trials", trials(tune)),
        ("best", "Best settings", best(tune)),
    ]
    if tune.refit:
        out.append(("refit", "Refit on the pool, scored on the held-out test", refit(tune)))
    if tune.tuning.nested is not None:
        out.append(("nested", "Nested cross-validation", nested(tune)))
    subject = "tuning search" + (" and its refit run" if tune.refit else "")
    out.append(("tripod", "TRIPOD+AI checklist", sections_run.tripod(tune.model, subject)))
    return out


def metric_label(tune: TuneInputs) -> str:
    return METRIC_WORDS.get(tune.metric, tune.metric)


def _value(value: Any) -> str:
    """A setting's value as the tables show it."""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return esc(value)


def summary(tune: TuneInputs) -> str:
    request, meta, tuning = tune.request, tune.meta, tune.tuning
    direction = "maximised" if tune.maximize else "minimised"
    failed = len(tune.trials) - tuning.complete - tuning.pruned
    other = failed - tune.count("FAIL")
    counts = (
        f"{len(tune.trials)} of {request.get('trials', '?')} asked: {tuning.complete} complete, "
        f"{tuning.pruned} pruned, {tune.count('FAIL')} failed"
        + (f", {other} running or waiting" if other else "")
    )
    best = (
        "none complete"
        if tuning.best_number is None
        else f"#{tuning.best_number}: {metric_label(tune)} {num(tuning.best_value)}"
    )
    time = (
        f"{float(meta['seconds']):.0f} s (started {request.get('created', '?')}, finished "
        f"{meta.get('finished', '?')})"
        if meta.get("seconds")
        else f"started {request.get('created', '?')}; not finished"
    )
    fixed = ", ".join(f"{k}={v}" for k, v in dict(request.get("fixed", {})).items())
    rows = [
        ("study", esc(tuning.study)),
        ("storage", esc(hide_password(str(request.get("storage", "?"))))),
        ("manifest", esc(request.get("manifest", "?"))),
        ("objective", f"{esc(metric_label(tune))}, {direction}, on {esc(tuning.scored_on)}"),
        (
            "patients",
            f"{esc(tuning.n_pool)} searched over; {esc(tuning.n_test)} held out, never seen by "
            "the search",
        ),
        (
            "sampler",
            f"{esc(tuning.sampler)} (seed {esc(request.get('seed', '?'))}), pruner "
            f"{esc(request.get('pruner', 'none'))}",
        ),
        ("trials", counts),
        ("best trial", best),
        ("settings searched", str(len(tuning.space))),
        ("settings fixed", esc(fixed or "none")),
        ("time", esc(time)),
        ("omnifuse", esc(meta.get("version_omnifuse", request.get("version", "?")))),
    ]
    return table(
        "tune-summary",
        ["", "value"],
        [(key, [esc(key), cell]) for key, cell in rows],
        numeric_from=99,
    )


def refit_score(tune: TuneInputs) -> tuple[str, str, str] | None:
    """(value, 95% CI, patients) of the refit run on its held-out test, in the search's metric."""
    if not tune.refit:
        return None
    rows = tune.model.metrics.set_index("metric")
    key = RUN_METRIC.get(tune.metric, tune.metric)
    if key not in rows.index:
        return None
    row = rows.loc[key]
    return (
        num(row["value"]),
        ci_range(row.get("ci_low"), row.get("ci_high")),
        tune.model.meta.get("n_test", "?"),
    )


def numbers(tune: TuneInputs) -> str:
    tuning, nested = tune.tuning, tune.tuning.nested
    label = metric_label(tune)
    rows = [
        (
            "best",
            [
                f"best trial #{tuning.best_number}'s own score",
                esc(label),
                num(tuning.best_value),
                "",
                f"{esc(tuning.n_pool)} (pool)",
                f"optimistic: the best of {tuning.complete} complete trials, chosen on the "
                f"same {esc(tuning.split)} it is scored on",
            ],
        )
    ]
    if nested is not None:
        rows.append(
            (
                "nested",
                [
                    f"nested cross-validation, mean of {nested.folds} outer folds",
                    esc(METRIC_WORDS.get(nested.metric, nested.metric)),
                    num(nested.outer_mean),
                    ci_range(nested.outer_ci_low, nested.outer_ci_high),
                    f"{esc(tuning.n_pool)} (pool)",
                    "honest: each outer fold scored by a search that never saw it",
                ],
            )
        )
        rows.append(
            (
                "nested-inner",
                [
                    "nested: the inner best trials' own scores, mean",
                    esc(METRIC_WORDS.get(nested.metric, nested.metric)),
                    num(nested.inner_mean),
                    "",
                    "",
                    "optimistic, like the best trial's: compare with the outer mean",
                ],
            )
        )
    scored = refit_score(tune)
    if scored is not None:
        value, interval, patients = scored
        rows.append(
            (
                "refit",
                [
                    "refit run on the held-out test",
                    esc(METRIC_LABELS.get(RUN_METRIC.get(tune.metric, ""), label)),
                    value,
                    interval,
                    f"{esc(patients)} (test)",
                    "honest: patients the search never saw, scored once",
                ],
            )
        )
    honest = [name for name, _ in rows if name in ("nested", "refit")]
    text = (
        f"<p>The best trial's score is optimistic: it was chosen as the best of "
        f"{tuning.complete} complete trials on the same {esc(tuning.split)} it is scored "
        "on, so part of its lead is luck. "
        + (
            "The honest numbers are the ones below it: the held-out test score of the refit "
            "run and the nested cross-validation estimate."
            if len(honest) == 2
            else "The honest number is the "
            + (
                "held-out test score of the refit run below it."
                if honest == ["refit"]
                else "nested cross-validation estimate below it."
            )
            if honest
            else "There is no honest estimate here: tune with --refit (scores the best "
            "settings on the held-out test patients) or --nested-cv K."
        )
        + "</p>"
    )
    return text + table(
        "tune-numbers",
        ["number", "metric", "value", "95% CI", "patients", "reads as"],
        rows,
        numeric_from=2,
        text=(4, 5),
    )


def _last_scores(tune: TuneInputs) -> dict[int, float]:
    frame = tune.intermediate
    if frame is None or not len(frame):
        return {}
    last = frame.sort_values("step").groupby("number")["value"].last()
    return {int(k): float(v) for k, v in last.items()}


def history(tune: TuneInputs, add: AddFigure) -> str:
    label = metric_label(tune)
    parts = [
        add(
            figures_tune.history(
                tune.trials, tune.maximize, label, tune.tuning.best_number, _last_scores(tune)
            ),
            "tune_history",
            "Optimisation history",
            f"Each complete trial's {label} on {tune.tuning.scored_on}; the line is the best "
            "so far, the ring the best trial.",
        )
    ]
    if tune.intermediate is not None and len(tune.intermediate):
        states = dict(zip(tune.trials["number"].astype(int), tune.trials["state"], strict=True))
        parts.append(
            add(
                figures_tune.intermediate(tune.intermediate, states, label),
                "tune_intermediate",
                "Intermediate scores",
                "The validation score each trial reported after every step: what the pruner "
                f"({tune.request.get('pruner', 'none')}) compared to stop a trial early.",
            )
        )
    if not any(parts):
        return '<p class="note">No complete trial yet.</p>'
    return "".join(parts)


def importance(tune: TuneInputs, add: AddFigure) -> str:
    if tune.importances is None:
        why = (
            "the study's storage could not be opened"
            if not tune.study_opened
            else "too few complete trials that differ in a setting"
        )
        return f'<p class="note">No parameter importances: {why} (see the notes above).</p>'
    return add(
        figures_tune.importances(tune.importances),
        "tune_importance",
        "Parameter importances",
        f"The share of the {metric_label(tune)}'s variation over the complete trials that each "
        "setting explains, by optuna's default importance evaluator on the study; a rough "
        "guide when the trials are few.",
    )


def slices(tune: TuneInputs, add: AddFigure) -> str:
    figure = add(
        figures_tune.slices(
            tune.trials,
            tune.params,
            tune.tuning.space,
            metric_label(tune),
            tune.tuning.best_number,
        ),
        "tune_slices",
        "Slices",
        "Each complete trial's objective value against one setting (log axis where the range "
        "was searched on a log scale; categories jittered sideways), coloured by trial number; "
        "the ring is the best trial.",
    )
    return figure or '<p class="note">No complete trial with a searched setting yet.</p>'


def trials(tune: TuneInputs) -> str:
    params = tune.params
    best = tune.tuning.best_number
    errors = "error" in tune.trials and bool((tune.trials["error"] != "").any())
    rows = []
    for _, row in tune.trials.iterrows():
        number = int(row["number"])
        marked = number == best
        rows.append(
            (
                str(number),
                [
                    f"<b>{number} (best)</b>" if marked else str(number),
                    esc(row["state"]),
                    num(row["value"]),
                    _value(row.get("duration_s", math.nan)),
                    _value(row.get("last_step", math.nan)),
                    *(_value(row.get(PARAM + p, "")) for p in params),
                    esc(row.get("run_dir", "")),
                    *([esc(row["error"])] if errors else []),
                ],
            )
        )
    return (
        f"<p>Every trial of {TRIALS}; the best is in bold. Each trial's own run folder (last "
        "column) holds its training curves.</p>"
        + table(
            "trials",
            [
                "trial",
                "state",
                metric_label(tune),
                "seconds",
                "last step",
                *params,
                "run folder",
                *(["error"] if errors else []),
            ],
            rows,
            numeric_from=2,
            text=(len(params) + 5, len(params) + 6),
        )
    )


def best(tune: TuneInputs) -> str:
    if tune.best is None:
        return '<p class="note">No complete trial yet.</p>'
    train = (
        "the refit run (below) trained them on the pool"
        if tune.refit
        else f"train them: omnifuse train {tune.request.get('manifest', 'MANIFEST')} "
        f"--num-classes {tune.request.get('num_classes', 'C')} --config "
        f"{tune.source / 'best.yaml'}"
    )
    text = f"<p>Trial #{tune.best.get('number')}'s settings (best.yaml); {esc(train)}.</p>"
    if tune.best_yaml:
        return text + f'<pre id="best-yaml">{esc(tune.best_yaml)}</pre>'
    settings = {**tune.best.get("params", {}), **tune.best.get("settings", {})}
    return text + f'<pre id="best-yaml">{esc(json.dumps(settings, indent=2))}</pre>'


def refit(tune: TuneInputs) -> str:
    model = tune.model
    return (
        f"<p>The best settings trained on the {esc(tune.tuning.n_pool)} patients the search "
        f"saw, scored once on {esc(model.evaluated_on)} ({esc(model.meta.get('n_test', '?'))} "
        f"patients the search never saw). Its own report: <code>omnifuse report "
        f"{esc(model.source)}</code>.</p>"
        + metrics_table("refit-metrics", model.metrics, REFIT_METRICS, cv=False)
    )


def nested(tune: TuneInputs) -> str:
    summary = tune.tuning.nested
    assert summary is not None
    label = METRIC_WORDS.get(summary.metric, summary.metric)
    text = (
        f"<p>The whole search repeated inside each of {summary.folds} outer folds of the pool, "
        f"its best settings scored on that fold: {esc(label)} {num(summary.outer_mean)} (95% "
        f"CI {ci_range(summary.outer_ci_low, summary.outer_ci_high)}), against "
        f"{num(summary.inner_mean)} for the best trials' own scores.</p>"
    )
    frame = tune.nested
    if frame is None:
        return text
    scores = [c for c in NESTED_SCORES if c in frame.columns]
    rows = [
        (
            str(int(r["outer_fold"])),
            [
                str(int(r["outer_fold"])),
                _value(r.get("n_train", "")),
                _value(r.get("n_test", "")),
                num(r.get("best_inner_value")),
                *(num(r[c]) for c in scores),
                esc(r.get("params", "")),
            ],
        )
        for _, r in frame.iterrows()
    ]
    words = {"outer_auroc": "AUROC", "outer_macro_f1": "macro-F1", "outer_log_loss": "log loss"}
    return text + table(
        "nested",
        [
            "outer fold",
            "pool patients",
            "fold patients",
            f"best inner {label}",
            *(f"outer {words[c]}" for c in scores),
            "settings chosen",
        ],
        rows,
        text=(len(scores) + 4,),
    )
