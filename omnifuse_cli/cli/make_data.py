"""`omnifuse make-data`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from omnifuse_cli.cli.common import console, handle_errors


@handle_errors
def make_data(
    out_dir: Annotated[
        Path, typer.Option("--out-dir", help="Folder to write the cohort to.")
    ] = Path("data_synth_raw"),
    n: Annotated[int, typer.Option("--n", help="Patients.")] = 60,
    seed: Annotated[int, typer.Option("--seed")] = 42,
    num_classes: Annotated[int, typer.Option("--num-classes", min=2)] = 3,
    labs_dim: Annotated[int, typer.Option("--labs-dim", help="Analytes per lab panel.")] = 20,
    image_size: Annotated[int, typer.Option("--image-size", help="PNG side in pixels.")] = 256,
    images_per_patient: Annotated[
        int, typer.Option("--images-per-patient", help="Most ultrasound views per patient.")
    ] = 3,
    missing_labs: Annotated[float, typer.Option("--missing-labs")] = 0.2,
    missing_us: Annotated[float, typer.Option("--missing-us")] = 0.3,
    missing_text: Annotated[float, typer.Option("--missing-text")] = 0.3,
    labs_signal: Annotated[float | None, typer.Option("--labs-signal")] = None,
    us_signal: Annotated[float | None, typer.Option("--us-signal")] = None,
    text_signal: Annotated[float | None, typer.Option("--text-signal")] = None,
    labs_noise: Annotated[float | None, typer.Option("--labs-noise")] = None,
    us_noise: Annotated[float | None, typer.Option("--us-noise")] = None,
    text_noise: Annotated[float | None, typer.Option("--text-noise")] = None,
    shared_severity: Annotated[
        float,
        typer.Option(
            "--shared-severity",
            help="Share of each modality's signal that follows the patient's "
            "own severity rather than the class's: 0 = modalities independent given the class, "
            "1 = all follow the patient.",
        ),
    ] = 0.5,
    corrupt_rate: Annotated[
        float,
        typer.Option(
            "--corrupt-rate",
            help="Share of patients (among those with 2+ modalities) with one "
            "modality replaced by uninformative data or another patient's; listed in truth.csv.",
        ),
    ] = 0.05,
    missing_mode: Annotated[
        str,
        typer.Option(
            "--missing-mode",
            help="mcar: --missing-* regardless of the patient; mnar: milder "
            "patients skip labs and ultrasound more often, same overall rates.",
        ),
    ] = "mcar",
    no_images: Annotated[
        bool,
        typer.Option(
            "--no-images",
            help="No ultrasound modality (no us column, no PNGs): labs and notes "
            "only, the fast way to a large cohort.",
        ),
    ] = False,
    inline_notes: Annotated[
        bool,
        typer.Option(
            "--inline-notes",
            help="Write each note into the manifest's text cell instead of "
            "text/<id>.txt (one file instead of one per patient).",
        ),
    ] = False,
    unlabeled: Annotated[
        int,
        typer.Option(
            "--unlabeled",
            min=0,
            help="Extra patients from the same generator written with an "
            "empty label (unlabeled: they train the imputation only); truth.csv keeps their "
            "labels.",
        ),
    ] = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Write into a non-empty --out-dir.")
    ] = False,
) -> None:
    """Generate a synthetic three-modality cohort (labs, ultrasound PNGs, Chinese notes).

    Every modality carries a controllable amount of label signal (--*-signal, --*-noise) and
    can be missing (--missing-*, --missing-mode); defaults make each modality alone informative
    but weaker than the fused model. Patients vary in severity within their class, partly shared
    by all their modalities (--shared-severity), and a few have one corrupted modality
    (--corrupt-rate); truth.csv records both. Every default is explained in
    `omnifuse_cli.synthetic`.
    """
    # Here, not at the top: these load torch and pandas, which `omnifuse --help` must not.
    from omnifuse_cli import api
    from omnifuse_cli.cli.render import counts_table

    knobs = {
        "labs_signal": labs_signal,
        "us_signal": us_signal,
        "text_signal": text_signal,
        "labs_noise": labs_noise,
        "us_noise": us_noise,
        "text_noise": text_noise,
    }
    spec = dict(
        n=n,
        seed=seed,
        num_classes=num_classes,
        labs_dim=labs_dim,
        image_size=image_size,
        images_per_patient=images_per_patient,
        missing_labs=missing_labs,
        missing_us=missing_us,
        missing_text=missing_text,
        shared_severity=shared_severity,
        corrupt_rate=corrupt_rate,
        missing_mode=missing_mode,
        ultrasound=not no_images,
        inline_notes=inline_notes,
        unlabeled=unlabeled,
        **{k: v for k, v in knobs.items() if v is not None},
    )
    from rich.progress import Progress  # ~15 ms that `omnifuse --help` need not pay

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("writing patients", total=n + unlabeled)
        summary = api.make_data(
            out_dir,
            overwrite=overwrite,
            on_progress=lambda e: progress.update(task, completed=e.done, total=e.total),
            **spec,
        )
    console.print(
        counts_table(
            {str(k): v for k, v in sorted(summary.label_counts.items())},
            "patients per class",
            key="label",
        )
    )
    console.print(
        counts_table(summary.present_counts, "patients with each modality", key="modality")
    )
    modalities = " --modality labs=vector --modality text=text" if no_images else ""
    corrupted = ", ".join(f"{m} {k}" for m, k in summary.corrupted_counts.items())
    console.print(
        f"{sum(summary.corrupted_counts.values())} patients with one corrupted "
        f"modality ({corrupted}), listed in {summary.truth.name}"
    )
    if summary.n_unlabeled:
        console.print(
            f"{summary.n_unlabeled} more patients with an empty label (unlabeled; "
            f"their labels are in {summary.truth.name})"
        )
    console.print(
        f"{summary.n_patients} patients, {summary.n_images} images written to "
        f"[bold]{summary.out_dir}[/]\nnext: omnifuse train {summary.manifest} "
        f"--num-classes {num_classes}{modalities}"
    )
