"""`omnifuse synth`."""

from __future__ import annotations

from typing import Annotated

import typer

from omnifuse_cli.cli import options
from omnifuse_cli.cli.common import console, handle_errors
from omnifuse_cli.config import MethodConfig
from omnifuse_cli.engine.events import ProgressEvent


@handle_errors
def synth(
    n: Annotated[int, typer.Option("--n", help="Patients.")] = 600,
    num_classes: Annotated[int, typer.Option("--num-classes", min=2)] = 3,
    missing_rate: Annotated[
        float, typer.Option("--missing-rate", help="Chance each modality is missing for a patient.")
    ] = 0.3,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 15,
    seed: Annotated[int, typer.Option("--seed")] = 42,
    no_imputation: Annotated[bool, typer.Option("--no-imputation")] = False,
    no_dwfuse: Annotated[bool, typer.Option("--no-dwfuse")] = False,
    no_tla: Annotated[bool, typer.Option("--no-tla")] = False,
    threads: options.Threads = None,
) -> None:
    """Feature-level demo in memory: watch every term of the OmniFuse objective fall."""
    # Here, not at the top: these load torch and pandas, which `omnifuse --help` must not.
    from omnifuse_cli.cli.render import add_epoch_row, epoch_table, metrics_table
    from omnifuse_cli.engine.demo import SynthConfig, run_synth

    cfg = SynthConfig(
        n=n,
        num_classes=num_classes,
        missing_rate=missing_rate,
        epochs=epochs,
        seed=seed,
        threads=threads,
    )
    method = MethodConfig(
        use_imputation=not no_imputation, use_dwfuse=not no_dwfuse, use_tla=not no_tla
    )
    console.print(
        f"synthetic cohort: {n} patients, modalities m1 (strong), m2 (medium), "
        f"m3 (weak signal), each missing with probability {missing_rate:g}"
    )
    table = epoch_table("loss terms per epoch (Eq. 18: fwd + λ1·bwd + λ2·dwfuse + λ3·tla)")

    def on_event(event: ProgressEvent) -> None:
        if event.kind == "epoch" and event.record is not None:
            add_epoch_row(table, event.record)

    from rich.live import Live  # ~15 ms with rich.progress that `omnifuse --help` need not pay

    with Live(table, console=console, refresh_per_second=4):
        result = run_synth(cfg, method, on_event)
    console.print()
    console.print(
        metrics_table(
            result.test,
            f"test metrics ({result.split_counts['test']} patients, best-on-validation epoch)",
        )
    )
