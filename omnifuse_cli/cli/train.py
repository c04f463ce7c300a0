"""`omnifuse train`."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from omnifuse_cli.cli import options
from omnifuse_cli.cli.common import console, handle_errors
from omnifuse_cli.cli.config_file import with_config_file
from omnifuse_cli.errors import ConfigError

_RUNS_HELP = "Run directory for metrics, split and model."
_RUNS_DEFAULT = "runs/run-YYYYmmdd-HHMMSS"


@handle_errors
@with_config_file
def train(
    manifest: Annotated[
        Path | None,
        typer.Argument(help="manifest.csv with columns id,label,<modalities>.", show_default=False),
    ] = None,
    manifest_opt: Annotated[
        Path | None,
        typer.Option("--manifest", help="Same as the MANIFEST argument (the seed's spelling)."),
    ] = None,
    num_classes: Annotated[
        int | None,
        typer.Option(
            "--num-classes",
            min=2,
            help="Number of classes; labels are 0..C-1. Required.",
            show_default=False,
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue an interrupted run from its last complete epoch (all other "
            "settings come from the run).",
            show_default=False,
        ),
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out-dir", help=_RUNS_HELP, show_default=_RUNS_DEFAULT)
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Write into a non-empty --out-dir, replacing its files."),
    ] = False,
    labs_table: options.LabsTable = None,
    labs_id_col: options.LabsIdCol = None,
    modality: options.Modality = None,
    on_bad_file: options.OnBadFile = "error",
    labs_format: options.LabsFormat = "auto",
    labs_agg: options.LabsAgg = "last",
    encoding: options.Encoding = "auto",
    on_empty_patient: options.OnEmptyPatient = "skip",
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 30,
    batch_size: options.BatchSize = 32,
    lr: Annotated[
        float, typer.Option("--lr", help="Learning rate of everything but pretrained backbones.")
    ] = 3e-4,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 1e-4,
    seed: Annotated[int, typer.Option("--seed")] = 42,
    train_ratio: Annotated[float, typer.Option("--train-ratio")] = 0.8,
    val_ratio: Annotated[float, typer.Option("--val-ratio")] = 0.1,
    test_ratio: Annotated[
        float,
        typer.Option(
            "--test-ratio",
            help="0: no internal test split (evaluate an external cohort with "
            "omnifuse evaluate RUN --manifest TEST.csv).",
        ),
    ] = 0.1,
    device: options.Device = "auto",
    threads: options.Threads = None,
    amp: Annotated[
        bool, typer.Option("--amp/--no-amp", help="bf16 autocast on CUDA (CPU always runs fp32).")
    ] = True,
    image_backbone: Annotated[
        str,
        typer.Option(
            "--image-backbone",
            help="Any torchvision classification model by name (resnet18, "
            "resnet50, densenet121, efficientnet_b0, convnext_tiny, mobilenet_v2, "
            "mobilenet_v3_large, ...; not googlenet, inception_v3 or squeezenet), without its "
            "classifier. For non-ResNets, --finetune-image-scope layer4 means the last block of "
            "its features and layer3+ the last two.",
        ),
    ] = "resnet34",
    image_size: Annotated[
        int, typer.Option("--image-size", help="Resize + CenterCrop side.")
    ] = 224,
    max_us_images: Annotated[
        int, typer.Option("--max-us-images", min=1, help="Images kept per patient.")
    ] = 4,
    pretrained_image: Annotated[
        bool | None,
        typer.Option(
            "--pretrained-image/--no-pretrained-image",
            help="ImageNet weights for the image backbone: --pretrained-image downloads them if "
            "needed (error when offline); --no-pretrained-image starts from random weights; by "
            "default they are used when already in the local torch cache.",
            show_default=False,
        ),
    ] = None,
    image_weights: Annotated[
        Path | None,
        typer.Option(
            "--image-weights",
            help="Local state dict of that torchvision model (.pth/.safetensors) "
            "for offline machines.",
        ),
    ] = None,
    text_encoder: Annotated[
        str,
        typer.Option(
            "--text-encoder",
            help="simple (offline n-grams, works for Chinese) or hf (transformers).",
        ),
    ] = "simple",
    text_model: Annotated[
        str, typer.Option("--text-model", help="hf: local folder or hub name.")
    ] = "bert-base-chinese",
    text_max_length: Annotated[
        int, typer.Option("--text-max-length", help="hf: tokens per note.")
    ] = 256,
    text_ngrams: Annotated[
        int,
        typer.Option(
            "--text-ngrams",
            min=1,
            max=4,
            help="simple: word n-grams up to N (Chinese characters up to N+1) in the tf-idf.",
        ),
    ] = 2,
    text_min_df: Annotated[
        int,
        typer.Option(
            "--text-min-df", min=1, help="simple: n-grams of fewer training notes are unknown."
        ),
    ] = 2,
    freeze_text: Annotated[
        bool, typer.Option("--freeze-text", help="Keep the hf text model frozen for the whole run.")
    ] = False,
    warmup_epochs: Annotated[
        int,
        typer.Option(
            "--warmup-epochs", min=0, help="Epochs with frozen backbones before fine-tuning."
        ),
    ] = 5,
    finetune_image_scope: Annotated[
        str,
        typer.Option(
            "--finetune-image-scope",
            help="After warm-up, unfreeze none, layer4, layer3+ or all "
            "of the image backbone (none keeps features cached: fastest on CPU).",
        ),
    ] = "none",
    finetune_text_last_n: Annotated[
        int,
        typer.Option(
            "--finetune-text-last-n",
            min=0,
            help="After warm-up, unfreeze the last N transformer layers of the hf text model.",
        ),
    ] = 0,
    lr_image: Annotated[float, typer.Option("--lr-image")] = 1e-4,
    lr_text: Annotated[float, typer.Option("--lr-text")] = 2e-5,
    no_imputation: Annotated[
        bool,
        typer.Option(
            "--no-imputation", help="Ablation: no CRA; missing slots keep the missing embedding."
        ),
    ] = False,
    no_backward: Annotated[
        bool, typer.Option("--no-backward", help="Ablation: forward imputation only, no cycle.")
    ] = False,
    no_dwfuse: Annotated[
        bool, typer.Option("--no-dwfuse", help="Ablation: one classifier on the concatenation.")
    ] = False,
    no_tla: Annotated[
        bool, typer.Option("--no-tla", help="Ablation: no laziness activation.")
    ] = False,
    inference_rule: Annotated[
        str,
        typer.Option(
            "--inference-rule",
            help="label-free (DWFuse rule), joint (RA head only) or mean (of modality heads).",
        ),
    ] = "label-free",
    modality_drop: Annotated[
        float,
        typer.Option(
            "--modality-drop",
            help="Training-time modality dropout (every variant): each present "
            "modality hidden with this probability, one always kept.",
        ),
    ] = 0.3,
    drop_full_view: Annotated[
        bool,
        typer.Option(
            "--drop-full-view/--no-drop-full-view",
            help="Supervise the undropped view of each batch as well as the dropped one.",
        ),
    ] = True,
    reliability: Annotated[
        str,
        typer.Option(
            "--reliability",
            help="Gate of imputed slots: auto (each modality's imputation R^2 on "
            "validation, re-estimated every epoch), or a fixed number in [0, 1]: 0 = imputed "
            "slots never count (as --no-imputation), 1 = the paper's rule.",
        ),
    ] = "auto",
    slot_flags: Annotated[
        bool,
        typer.Option(
            "--slot-flags/--no-slot-flags",
            help="Modality heads see whether their slot is observed or imputed.",
        ),
    ] = True,
    joint_input: Annotated[
        str,
        typer.Option(
            "--joint-input",
            help="Joint head input: latents (CRA latents, the paper), slots (fused slots) or both.",
        ),
    ] = "latents",
    imputation_loss: Annotated[
        str,
        typer.Option(
            "--imputation-loss",
            help="normalized (standardised slots, dropped slots only) or "
            "paper (Eq. 7 with the complementary target).",
        ),
    ] = "normalized",
    lambda0: Annotated[
        float,
        typer.Option("--lambda0", help="Weight of the forward imputation loss (the paper's is 1)."),
    ] = 10.0,
    ra_layers: Annotated[
        str,
        typer.Option(
            "--ra-layers",
            help="Residual autoencoder widths, comma-separated; the last is the "
            "latent (MMIN's: 256,128,64).",
        ),
    ] = "128,32",
    num_ra: Annotated[
        int, typer.Option("--num-ra", min=1, help="Residual autoencoders per cascade (K).")
    ] = 5,
    cra_dropout: Annotated[
        float, typer.Option("--cra-dropout", help="Dropout inside the residual autoencoders.")
    ] = 0.2,
    tla_min_patients: Annotated[
        int,
        typer.Option(
            "--tla-min-patients",
            min=1,
            help="TLA only picks a combination that at least this "
            "many mined training patients have.",
        ),
    ] = 20,
    linear_path: Annotated[
        bool,
        typer.Option(
            "--linear-path/--no-linear-path",
            help="After training, fit a logistic regression on "
            "the sparse inputs (tf-idf n-grams of simple-encoder notes, lab values) and blend it "
            "with OmniFuse by validation log loss.",
        ),
    ] = True,
    select_by: Annotated[
        str,
        typer.Option(
            "--select-by",
            help="Validation score that picks the best epoch: macro_f1, loss "
            "(log loss) or auroc (kept on validation evidence: benchmarks/results/selection.md).",
        ),
    ] = "macro_f1",
    patience: Annotated[
        int,
        typer.Option(
            "--patience",
            min=0,
            help="Stop after this many epochs without a better validation "
            "--select-by score, keeping the best epoch (0: train every epoch).",
        ),
    ] = 0,
    class_weight: Annotated[
        str,
        typer.Option(
            "--class-weight",
            help="Weight of each class in every loss term that sees labels: none, "
            "balanced (inverse class frequency on the training patients) or one weight per class "
            "in class order, e.g. 1,3.",
        ),
    ] = "none",
    calibrate: Annotated[
        str,
        typer.Option(
            "--calibrate",
            help="temperature: fit one temperature on the validation split by log "
            "loss after the best epoch (stored in the bundle, applied by evaluate, predict and "
            "cv); "
            "none: keep the raw probabilities. Validation splits under 30 patients are not "
            "calibrated (a note says so).",
        ),
    ] = "temperature",
    positive_class: Annotated[
        str | None,
        typer.Option(
            "--positive-class",
            help="Class called positive by the operating point: binary tasks "
            "default to the second class (1); with more classes, one-vs-rest for this class.",
        ),
    ] = None,
    threshold: Annotated[
        str,
        typer.Option(
            "--threshold",
            help="Operating point chosen on validation for the positive class: "
            "youden, f1, sens=0.9, spec=0.9, ppv=0.5 or npv=0.95 (the most specific / most "
            "sensitive threshold that meets the target).",
        ),
    ] = "youden",
    embed_dim: Annotated[int, typer.Option("--embed-dim")] = 128,
    num_workers: Annotated[
        int, typer.Option("--num-workers", min=0, help="DataLoader worker processes.")
    ] = 0,
    cache: options.Cache = True,
    cache_dir: options.CacheDir = None,
) -> None:
    """Train OmniFuse on a manifest: stratified split, best-on-validation model, test metrics."""
    values = dict(locals())  # every parameter by name (nothing else is defined yet)
    from omnifuse_cli.cli.config_file import run_settings
    from omnifuse_cli.cli.render import (
        add_epoch_row,
        confusion_table,
        epoch_table,
        metrics_table,
        split_summary_table,
    )
    from omnifuse_cli.cli.train_options import build_configs
    from omnifuse_cli.engine.events import ProgressEvent
    from omnifuse_cli.engine.training import TrainRequest, load_request, run_training

    if resume is not None:
        request = load_request(resume)
        console.print(f"resuming {resume} (settings from its request.json)")
    else:
        path = _one_manifest(manifest, manifest_opt)
        if num_classes is None:
            raise ConfigError(
                "--num-classes is required", hint=f"omnifuse train {path} --num-classes C"
            )
        settings = build_configs(values)
        run_dir = out_dir or Path("runs") / datetime.now().strftime("run-%Y%m%d-%H%M%S")
        request = TrainRequest(
            manifest=path,
            num_classes=num_classes,
            out_dir=run_dir,
            data=settings.data,
            method=settings.method,
            train=settings.train,
            overwrite=overwrite,
            config_yaml=run_settings("train", {**values, "manifest": path}),
        )

    from rich.markup import escape

    from omnifuse_cli.cli.progress import live_progress, stamp

    table = epoch_table(f"training on {request.manifest}")
    # The live display starts with the first progress event, so input errors (raised before any
    # work starts) print alone, without an empty table above them. Plain lines without a TTY.
    live, progress = live_progress(table, console)
    task = progress.add_task("preparing", total=None)

    def on_event(event: ProgressEvent) -> None:
        if event.kind == "message":
            console.print(f"[dim]·[/] {stamp(console)}{escape(event.text)}")
            return
        if not live.is_started:
            live.start()
        if event.kind == "encode":
            progress.update(
                task, description="encoding (once)", completed=event.done, total=event.total
            )
        elif event.kind == "batch":
            progress.update(task, description="training", completed=event.done, total=event.total)
        elif event.kind == "epoch" and event.record is not None:
            add_epoch_row(table, event.record)

    try:
        result = run_training(request, on_event, resume=resume is not None)
    finally:
        progress.update(task, visible=False)
        live.stop()
    console.print()
    console.print(
        f"best epoch: {result.best_epoch} (best validation "
        f"{request.train.select_metric.replace('_', '-')}); "
        f"split train/val/test = {result.split_counts['train']}/"
        f"{result.split_counts['val']}/{result.split_counts['test']}; "
        f"device {result.device}"
    )
    if result.split_summary is not None:
        console.print(split_summary_table(result.split_summary))
    if result.confusion is None:
        console.print(
            "no internal test split (--test-ratio 0): evaluate an external cohort "
            f"with omnifuse evaluate {result.out_dir} --manifest TEST.csv"
        )
    else:
        console.print(metrics_table(result.test, "test metrics (best checkpoint)"))
        console.print(
            confusion_table(
                result.confusion, result.class_names, "test confusion matrix (rows = true)"
            )
        )
    console.print(
        f"run saved to [bold]{result.out_dir}[/]  ·  next: omnifuse evaluate "
        f"{result.out_dir}  ·  omnifuse predict PATIENTS.csv --run {result.out_dir}"
    )


def _one_manifest(argument: Path | None, option: Path | None) -> Path:
    if argument is not None and option is not None and argument != option:
        raise ConfigError(f"two manifests given: {argument} and --manifest {option}")
    path = argument or option
    if path is None:
        raise ConfigError("no manifest given", hint="omnifuse train MANIFEST --num-classes C")
    return path
