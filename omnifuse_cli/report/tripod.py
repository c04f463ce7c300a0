"""The TRIPOD+AI checklist (Collins et al., BMJ 2024;385:e078378), filled with what a run or a
cross-validation knows; everything else is marked for the author. Item numbers follow the
statement's main checklist (check them against the published table before submission)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import cast

from omnifuse_cli.report import tripod_results
from omnifuse_cli.report.clinical_inputs import LEGACY
from omnifuse_cli.report.inputs import ReportInputs
from omnifuse_cli.report.tripod_results import fmt as _fmt
from omnifuse_cli.report.tuning import describe

AUTHOR = ""  # an item only the author can fill
NO_MODEL = (
    "no model was trained from the chosen settings in this folder (tune without --refit): "
    "train one (omnifuse train MANIFEST --config best.yaml) and report that run"
)
MODEL_ITEMS = ("7", "9", "11", "13", "14", "15", "16", "21", "22", "23")  # need a trained model


@dataclass
class Item:
    number: str
    topic: str
    asks: str
    known: str  # what the run or cross-validation says; AUTHOR when nothing


def _validation(inputs: ReportInputs) -> str:
    meta = inputs.meta
    if inputs.kind == "cv":
        return (
            meta.get("validation", "k-fold cross-validation") + ". The test fold never "
            "chooses anything: each fold's epoch is picked on its inner validation split; "
            "out-of-fold predictions of every patient are pooled."
        )
    return (
        f"one stratified split: {meta.get('n_train', '?')} training, "
        f"{meta.get('n_val', '?')} validation (picks the epoch), {meta.get('n_test', '?')} "
        f"test patients (ratios {meta.get('train_ratio', '?')}/{meta.get('val_ratio', '?')}"
        f"/{meta.get('test_ratio', '?')}, seed {meta.get('seed', '?')})"
    )


def _missing(inputs: ReportInputs) -> str:
    meta = inputs.meta
    if meta.get("use_imputation", "True") == "True":
        cascades = (
            "forward and backward" if meta.get("use_backward", "True") == "True" else "forward"
        )
        handled = (
            "whole missing modalities are imputed in embedding space by OmniFuse's "
            f"cascaded residual autoencoders ({cascades} imputation), supervised by "
            "dropping present modalities during training (rate "
            f"{meta.get('modality_drop', '?')})"
        )
    else:
        handled = (
            "whole missing modalities are not imputed (--no-imputation): their slot "
            "keeps a learned missing embedding"
        )
    text = (
        f"{handled}; a missing lab value is masked (the encoder sees the value and its "
        "presence), never filled with a number; no patient is excluded for missing data."
    )
    if inputs.cohort is not None and (inputs.cohort["modalities"] != "").any():
        counts = inputs.cohort["modalities"].value_counts()
        full = "+".join(inputs.modalities)
        text += (
            f" {int(counts.get(full, 0))} of {len(inputs.cohort)} patients have every "
            f"modality; {len(counts)} missing patterns (see Cohort)."
        )
    return text


def _output(inputs: ReportInputs) -> str:
    """Item 15: the probabilities and how a class is chosen."""
    clinical = inputs.clinical
    cv = inputs.kind == "cv"
    if clinical.legacy:
        return f"a probability per class; {LEGACY}: the predicted class is the most probable one"
    if cv:
        probs = (
            "a probability per class, calibrated by a temperature fitted on each fold's "
            "inner validation split"
            if clinical.calibrated
            else "a probability per class (not calibrated: temperature 1 in every fold)"
        )
    elif clinical.calibrated:
        probs = (
            f"a probability per class, calibrated by temperature scaling (temperature "
            f"{clinical.temperature:.3f}, fitted on the validation split)"
        )
    else:
        probs = "a probability per class (not calibrated: temperature 1)"
    if clinical.threshold is not None and clinical.positive_class is not None:
        decision = (
            f"class {clinical.positive_class} is predicted when its probability is at "
            f"least {_fmt(clinical.threshold)} (rule {clinical.rule}, chosen on the "
            "validation split"
            + (" of each fold; the mean of the folds'" if cv else "")
            + "), otherwise the most probable other class"
        )
    else:
        decision = "the predicted class is the most probable one (no threshold tuned)"
    sets = ""
    if clinical.coverage is not None and len(clinical.coverage):
        alpha = float(clinical.coverage["alpha"].iloc[0])
        sets = (
            f"; conformal prediction sets with {1 - alpha:.0%} target coverage (omnifuse "
            "predict --conformal)"
        )
    return f"{probs}; {decision}{sets}"


def _methods_posthoc(inputs: ReportInputs) -> str:
    """Item 12: what was fitted after training, and the measures it adds."""
    clinical = inputs.clinical
    cv = inputs.kind == "cv"
    if clinical.legacy:
        return f" Post-hoc: none ({LEGACY})."
    if cv:
        calibration = (
            "a temperature per fold (temperature scaling, log loss)"
            if clinical.calibrated
            else "no calibration (temperature 1 in every fold)"
        )
    else:
        calibration = (
            f"temperature scaling by log loss (temperature {clinical.temperature:.3f})"
            if clinical.calibrated
            else "no calibration (temperature 1)"
        )
    threshold = (
        f"the operating threshold of class {clinical.positive_class} (rule {clinical.rule})"
        if clinical.threshold is not None
        else "no operating threshold (the most probable class is predicted)"
    )
    measures = []
    if clinical.calibration is not None:
        measures.append(
            "calibration before and after (ECE, Brier, log loss, calibration intercept and slope)"
        )
    if clinical.operating is not None:
        measures.append("sensitivity, specificity, PPV, NPV and F1 at the operating point")
    if clinical.decision is not None:
        measures.append("net benefit (decision curves)")
    if clinical.coverage is not None:
        measures.append("conformal coverage by class and missing pattern")
    return (
        " Post-hoc, on the validation split"
        + (" of each fold" if cv else "")
        + f": {calibration}; {threshold}; split conformal scores (LAC)."
        + (" Also measured: " + "; ".join(measures) + "." if measures else "")
    )


def checklist(inputs: ReportInputs) -> list[Item]:
    meta = inputs.meta
    n = meta.get("n_patients", str(len(inputs.cohort)) if inputs.cohort is not None else "?")
    counts = ""
    if inputs.cohort is not None:
        per = inputs.cohort["label"].value_counts().sort_index()
        # labels are ints (read with astype(int)); pandas' stubs type an index label as Hashable
        counts = ", ".join(
            f"class {inputs.class_names[int(cast(int, c))]}: {int(k)}" for c, k in per.items()
        )
    kinds = meta.get("modalities", "").replace(",", ", ")
    image = (
        f"images resized and centre-cropped to {meta.get('image_image_size', '?')} px, at "
        f"most {meta.get('image_max_images', '?')} per patient, encoded by "
        f"{meta.get('image_backbone', '?')} ({meta.get('image_weights', '?')})"
    )
    method = (
        f"OmniFuse (embedding {meta.get('embed_dim', '?')}, DWFuse "
        f"{'on' if meta.get('use_dwfuse', 'True') == 'True' else 'off'}, TLA "
        f"{'on' if meta.get('use_tla', 'True') == 'True' else 'off'}, inference rule "
        f"{meta.get('inference_rule', '?')}); AdamW lr {meta.get('lr', '?')}, "
        f"{meta.get('epochs', '?')} epochs, batch {meta.get('batch_size', '?')}, seed "
        f"{meta.get('seed', '?')}"
    )
    groups = ""
    if inputs.cohort is not None:
        sizes = inputs.cohort["group"].astype(str).value_counts()
        groups = ", ".join(f"{g}: {int(k)}" for g, k in sorted(sizes.items()))
    versions = ", ".join(
        f"{k.removeprefix('version_')} {v}" for k, v in meta.items() if k.startswith("version_")
    )
    tuning = "" if inputs.tuning is None else f" Settings: {describe(inputs.tuning)}."
    items = [
        Item(
            "1",
            "Title",
            "development and/or evaluation of a prediction model, population, "
            "outcome, modelling approach",
            AUTHOR,
        ),
        Item("2", "Abstract", "structured summary (TRIPOD+AI for Abstracts)", AUTHOR),
        Item(
            "3", "Background", "healthcare context, target population, health inequalities", AUTHOR
        ),
        Item(
            "4",
            "Objectives",
            "development, evaluation or both",
            "development and internal validation of a multimodal classification model"
            + (" by cross-validation" if inputs.kind == "cv" else " on a held-out test split"),
        ),
        Item(
            "5",
            "Data",
            "data sources and dates",
            f"manifest {meta.get('manifest', '?')}"
            + (f", labs table {meta['labs_table']}" if meta.get("labs_table") else "")
            + "; dates: for the author",
        ),
        Item("6", "Participants", "setting, eligibility, treatments", AUTHOR),
        Item(
            "7",
            "Data preparation",
            "pre-processing and quality checks",
            f"lab values standardised with the training patients' means and SDs; notes "
            f"encoded by the {meta.get('text_encoder', '?')} text encoder (vocabulary fitted "
            f"on training patients); {image}; unreadable images: "
            f"{meta.get('on_bad_file', 'error')}",
        ),
        Item(
            "8",
            "Outcome",
            "definition, how and when assessed",
            f"{inputs.num_classes} classes ({counts}); definition: for the author",
        ),
        Item(
            "9",
            "Predictors",
            "which, how and when measured",
            f"modalities {kinds}; their clinical definition: for the author",
        ),
        Item(
            "10",
            "Sample size",
            "how the study size was arrived at",
            f"{n} patients ({counts}); justification: for the author",
        ),
        Item("11", "Missing data", "how missing data were handled", _missing(inputs)),
        Item(
            "12",
            "Analytical methods",
            "data use, model, tuning, internal validation, performance measures",
            f"{method}. Validation: {_validation(inputs).rstrip('.')}.{tuning} Measures: accuracy, "
            "macro-F1, balanced accuracy, AUROC and AUPRC (one-vs-rest macro), log loss, ECE, "
            "Brier score, with percentile bootstrap 95% intervals over patients"
            + (f" ({meta['bootstrap']} resamples)" if meta.get("bootstrap") else "")
            + "."
            + _methods_posthoc(inputs),
        ),
        Item(
            "13",
            "Class imbalance",
            "methods for class imbalance",
            "no resampling or class weights; splits stratified by class; macro-F1 and balanced "
            "accuracy reported",
        ),
        Item("14", "Fairness", "approaches to address fairness", tripod_results.fairness(inputs)),
        Item(
            "15",
            "Model output",
            "form of the output, thresholds and how they were chosen",
            _output(inputs),
        ),
        Item(
            "16",
            "Training versus evaluation",
            "differences between development and evaluation data",
            "internal validation only: same source and population"
            if inputs.kind == "cv"
            else "test split of the same source and population",
        ),
        Item("17", "Ethical approval", "", AUTHOR),
        Item(
            "18",
            "Open science",
            "funding, conflicts, protocol, registration, data and code",
            f"code: omnifuse ({versions}); every setting in "
            + ("cv.json and meta.csv" if inputs.kind == "cv" else "request.json and meta.csv")
            + "; the rest: for the author",
        ),
        Item("19", "Patient and public involvement", "", AUTHOR),
        Item(
            "20",
            "Participants (results)",
            "flow of participants, characteristics",
            f"{n} patients in the manifest, all used (patients are never dropped; unreadable "
            f"rows stop the run); per {inputs.group_name}: {groups}",
        ),
        Item(
            "21",
            "Model development",
            "participants and outcome events in each analysis",
            "see the cohort section and per-fold table"
            if inputs.kind == "cv"
            else "see the cohort section",
        ),
        Item(
            "22",
            "Model specification",
            "details to use the model",
            "the model folder holds every weight and setting: omnifuse predict PATIENTS.csv "
            "--run "
            + (
                f"{inputs.source}/final (with --refit)"
                if inputs.kind == "cv"
                else str(inputs.source)
            ),
        ),
        Item(
            "23",
            "Model performance",
            "performance with confidence intervals, subgroups",
            " ".join(
                part
                for part in (
                    tripod_results.performance(inputs),
                    tripod_results.calibration_result(inputs),
                    tripod_results.operating_result(inputs),
                    tripod_results.subgroup_result(inputs),
                    "Metrics per missing pattern: see Modalities.",
                )
                if part
            ),
        ),
        Item("24", "Model updating", "", AUTHOR),
        Item("25", "Interpretation", "", AUTHOR),
        Item("26", "Limitations", "", AUTHOR),
        Item("27", "Usability", "use in context, implications", AUTHOR),
    ]
    return items if inputs.kind != "tune" else _without_model(inputs, items, versions)


def _without_model(inputs: ReportInputs, items: list[Item], versions: str) -> list[Item]:
    """A tune folder without a refit run: the search and its patients, no model."""
    tuning = inputs.tuning
    assert tuning is not None
    n = inputs.meta.get("n_patients", "?")
    known = {
        "4": "choice of the training settings of a multimodal classification model by a "
        "search (no model is trained or evaluated in this folder)",
        "10": f"{n} patients: {tuning.n_pool} for the search, {tuning.n_test} held out; "
        "justification: for the author",
        "12": f"Settings: {describe(tuning)}. The chosen settings are in best.yaml.",
        "18": f"code: omnifuse ({versions}); every setting in tune.json, trials.csv and "
        "best.yaml; the rest: for the author",
        "20": f"{n} patients in the manifest: {tuning.n_pool} searched over, {tuning.n_test} "
        "held out",
    }
    return [
        replace(item, known=NO_MODEL)
        if item.number in MODEL_ITEMS
        else replace(item, known=known.get(item.number, item.known))
        for item in items
    ]
