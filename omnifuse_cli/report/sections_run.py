"""The report's sections about the run itself: the cohort, training curves, modalities (DWFuse
weights, missing patterns), a cross-validation's folds and variants, and the TRIPOD+AI
checklist."""

from __future__ import annotations

from omnifuse_cli.report import figures
from omnifuse_cli.report.inputs import ReportInputs, group_order
from omnifuse_cli.report.markup import METRIC_LABELS, AddFigure, ci_range, esc, num, table
from omnifuse_cli.report.tripod import checklist


def cohort(inputs: ReportInputs, add: AddFigure) -> str:
    parts = []
    cohort = inputs.cohort
    n = inputs.meta.get("n_patients", str(len(cohort)) if cohort is not None else "?")
    parts.append(
        f"<p>{esc(n)} patients, {inputs.num_classes} classes, modalities "
        f"{esc(', '.join(inputs.modalities))}. Excluded: none (omnifuse never drops "
        "patients; an unreadable manifest row stops the run)"
        + (f". Notes: {esc(inputs.meta['notes'])}" if inputs.meta.get("notes") else "")
        + ".</p>"
    )
    if cohort is None:
        return "".join(parts)
    groups = group_order(cohort["group"])
    rows = []
    for c, name in enumerate(inputs.class_names):
        counts = [
            int(((cohort["group"].astype(str) == g) & (cohort["label"] == c)).sum()) for g in groups
        ]
        rows.append((name, [esc(name), *(str(k) for k in counts), str(sum(counts))]))
    totals = [int((cohort["group"].astype(str) == g).sum()) for g in groups]
    rows.append(("all", ["all", *(str(k) for k in totals), str(sum(totals))]))
    parts.append(table("class-counts", ["class", *groups, "all"], rows))
    parts.append(
        add(
            figures.class_counts(cohort, inputs.class_names, inputs.group_name),
            "classes",
            f"Patients per class and {inputs.group_name}",
            "Stratified by class.",
        )
    )
    known = cohort[cohort["modalities"] != ""]
    if len(known):
        sets = known["modalities"].str.split("+")
        presence = []
        for m in inputs.modalities:
            has = sets.apply(lambda s, m=m: m in s)
            presence.append((m, [esc(m), str(int(has.sum())), f"{has.mean():.0%}"]))
        parts.append(table("presence", ["modality", "patients", "share"], presence))
        patterns = known["modalities"].value_counts()
        parts.append(
            add(
                figures.missing_patterns(patterns, inputs.modalities),
                "missing",
                "Missing patterns",
                f"{len(known)} patients by the set of modalities they have (bars), "
                "that set (dots) and each modality's presence (left).",
            )
        )
    return "".join(parts)


def training(inputs: ReportInputs, add: AddFigure) -> str:
    if not inputs.curves:
        return '<p class="note">No per-epoch metrics were found.</p>'
    several = len(inputs.curves) > 1
    caption = (
        "Per epoch: each loss term of the objective (symmetric log scale), validation "
        "metrics, and the modality combination TLA activated in the next epoch"
        + (
            f"; mean and range over {len(inputs.curves)} folds of the base model."
            if several
            else "."
        )
    )
    best = ""
    if not several:
        frame = inputs.curves["run"]
        if "best" in frame:
            picked = frame[frame["best"] == 1]["epoch"]
            if len(picked):
                best = (
                    f"<p>Best epoch (kept): {int(picked.iloc[-1])} of {len(frame)}, chosen "
                    "on the validation split.</p>"
                )
    return (
        best
        + _stopped(inputs.meta)
        + add(figures.training(inputs.curves), "training", "Training curves", caption)
    )


def _stopped(meta: dict[str, str]) -> str:
    """Why training ended and, under --time-limit, the budget and what it used."""
    parts = []
    if meta.get("stopped"):
        parts.append(f"Training ended: {esc(meta['stopped'])}.")
    if float(meta.get("time_limit") or 0) > 0:
        parts.append(
            f"Time limit {esc(meta['time_limit'])} s (--time-limit); the run used "
            f"{esc(meta.get('time_used', ''))} s."
        )
    return f"<p>{' '.join(parts)}</p>" if parts else ""


def modalities(inputs: ReportInputs, add: AddFigure) -> str:
    parts = []
    if inputs.predictions is not None:
        parts.append(
            add(
                figures.dwfuse_weights(inputs.predictions, inputs.modalities, inputs.class_names),
                "weights",
                "DWFuse weights",
                "Each modality's DWFuse weight at the predicted class (for a missing "
                "modality, its imputed slot's), by true class; boxes span the "
                "quartiles, whiskers 1.5 IQR.",
            )
        )
    if inputs.patterns is not None and len(inputs.patterns):
        rows = [
            (
                str(r["present"]),
                [
                    esc(r["present"]),
                    str(int(r["n"])),
                    num(r["acc"]),
                    num(r["macro_f1"]),
                    num(r["auroc"]),
                ],
            )
            for _, r in inputs.patterns.iterrows()
        ]
        parts.append(
            table(
                "patterns",
                ["modalities present", "patients", "accuracy", "macro-F1", "AUROC"],
                rows,
            )
        )
        parts.append(
            add(
                figures.pattern_metrics(inputs.patterns),
                "patterns",
                "Metrics by missing pattern",
                "n/a (a class absent) is drawn as 0.",
            )
        )
    if not parts:
        parts.append(
            '<p class="note">Run omnifuse evaluate on this run for DWFuse weights and '
            "metrics per missing pattern.</p>"
        )
    return "".join(parts)


def folds(inputs: ReportInputs) -> str:
    frame = inputs.fold_metrics
    if frame is None or not len(frame):
        return ""
    frame = frame[frame["variant"] == "base"]
    keys = ("acc", "macro_f1", "auroc", "brier")
    rows = [
        (
            f"{int(r['repeat'])}-{int(r['fold'])}",
            [
                str(int(r["repeat"])),
                str(int(r["fold"])),
                str(int(r["n"])),
                str(int(r["best_epoch"])),
                *(num(r[k]) for k in keys),
            ],
        )
        for _, r in frame.iterrows()
    ]
    return (
        "<p>Each fold's test patients, scored by the model trained on the other folds.</p>"
        + table(
            "fold-metrics",
            ["repeat", "fold", "test patients", "best epoch", *(METRIC_LABELS[k] for k in keys)],
            rows,
            numeric_from=2,
        )
    )


def variants(inputs: ReportInputs, add: AddFigure) -> str:
    assert inputs.differences is not None
    flags = "".join(
        f"<li><b>{esc(name)}</b>: <code>{esc(f)}</code></li>" for name, f in inputs.variants.items()
    )
    parts = [
        f"<p>Every variant was trained on the same folds as the base model:</p><ul>{flags}</ul>"
    ]
    if inputs.variant_metrics is not None:
        keys = ("macro_f1", "auroc", "acc", "brier")
        wide = inputs.variant_metrics.pivot(index="variant", columns="metric", values="value")
        order = list(dict.fromkeys(inputs.variant_metrics["variant"]))
        rows = [(v, [esc(v), *(num(wide.loc[v, k]) for k in keys)]) for v in order]
        parts.append(table("variant-metrics", ["variant", *(METRIC_LABELS[k] for k in keys)], rows))
    rows = [
        (
            f"{r['variant']}:{r['metric']}",
            [
                esc(r["variant"]),
                esc(METRIC_LABELS.get(r["metric"], r["metric"])),
                f"{float(r['difference']):+.3f}",
                ci_range(r["ci_low"], r["ci_high"]),
                f"{num(r['fold_mean'])} ± {num(r['fold_sd'])}",
            ],
        )
        for _, r in inputs.differences.iterrows()
    ]
    parts.append(
        table(
            "differences",
            [
                "variant",
                "metric",
                "difference (variant - base)",
                "95% CI (paired bootstrap)",
                "folds: mean ± SD",
            ],
            rows,
            numeric_from=2,
        )
    )
    parts.append(
        add(
            figures.forest(inputs.differences),
            "forest",
            "Paired differences",
            "Pooled out-of-fold metric of each variant minus the base model's; lines: "
            "95% paired bootstrap intervals (both models scored on the same resampled "
            "patients).",
        )
    )
    return "".join(parts)


def tripod(inputs: ReportInputs, subject: str | None = None) -> str:
    """The checklist's table; ``subject``: what the page calls the output (default: run or
    cross-validation)."""
    rows = []
    for item in checklist(inputs):
        known = esc(item.known) if item.known else '<span class="author">for the author</span>'
        rows.append((item.number, [esc(item.number), esc(item.topic), esc(item.asks), known]))
    return (
        "<p>What this "
        + (subject or ("cross-validation" if inputs.kind == "cv" else "run"))
        + " knows, item by item; the rest is for the author.</p>"
        + table("tripod", ["item", "topic", "asks for", "from this output"], rows, numeric_from=99)
    )


def bagging(inputs: ReportInputs) -> str:
    """--bag-folds / --ensemble: the folds that finished and each ensemble member's weight and
    out-of-fold score, so a reader sees how much the fusion model contributes."""
    meta = inputs.meta
    if not meta.get("bag_folds_planned"):
        return ""
    parts = [
        f"<p>{esc(meta.get('bag_folds_finished', ''))} of {esc(meta['bag_folds_planned'])} "
        "bagged OmniFuse models, each trained on the other folds of the training patients and "
        "early-stopped on its own fold (best epochs "
        f"{esc(meta.get('bag_best_epochs', ''))}); prediction averages them. Calibration and "
        f"the operating point were fitted on {esc(meta.get('bag_oof_patients', ''))} "
        "out-of-fold predictions.</p>"
    ]
    names = [k[len("ensemble_weight_") :] for k in meta if k.startswith("ensemble_weight_")]
    if names:
        metric = meta.get("ensemble_metric", "")
        rows = [
            (
                name,
                [
                    esc(name),
                    esc(meta[f"ensemble_weight_{name}"]),
                    esc(meta.get(f"ensemble_oof_{name}", "")),
                ],
            )
            for name in names
        ]
        parts.append(
            "<p>Weighted ensemble (greedy selection with replacement, Caruana et al. 2004) on "
            f"the out-of-fold {esc(metric)}; ensemble out-of-fold score "
            f"{esc(meta.get('ensemble_oof_score', ''))}.</p>"
        )
        parts.append(table("ensemble", ["member", "weight", f"out-of-fold {metric}"], rows))
    return "".join(parts)
