"""First-day rough edges (issue 11 item 3): help texts, unscoreable patients in predict, the
labs-table hint, row + id in errors, file modes, the split summary and whole table titles."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from omnifuse_cli.cli.app import app
from omnifuse_cli.engine.training import TrainResult, run_training

from .conftest import N_PATIENTS, tiny_request
from .helpers import flat, invoke

Run = tuple[Path, TrainResult]


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def copy_data(manifest: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(manifest.parent, tmp_path / "data")) / "manifest.csv"


# -- predict: a row for every patient ---------------------------------------------------------


def test_predict_scores_every_patient_it_can(
    trained_run: Run, tiny_manifest: Path, tmp_path: Path
) -> None:
    run = trained_run[0]
    full = invoke(
        "predict", tiny_manifest, "--run", run, "--out", tmp_path / "all.csv", "--device", "cpu"
    )
    assert full.exit_code == 0, full.output
    assert "warning" not in full.stderr
    reference = read(tmp_path / "all.csv")
    assert list(reference.columns)[-1] == "reason" and (reference["reason"] == "").all()

    data = copy_data(tiny_manifest, tmp_path)
    frame = read(data)
    frame.loc[1, ["labs", "us", "text"]] = ""  # nothing left to score
    frame.loc[3, "us"] = "us/gone.png"  # an unreadable cell
    frame.to_csv(data, index=False)
    out = tmp_path / "predictions.csv"
    result = invoke("predict", data, "--run", run, "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output + result.stderr
    warning = flat(result.stderr)
    assert warning.startswith(f"warning: 2 of {N_PATIENTS} patient(s) could not be scored")
    assert "row 3 (id 0000001002): no modality present" in warning
    assert "row 5 (id 0000001004): row 5, column 'us': image" in warning
    preds = read(out)
    assert len(preds) == N_PATIENTS and preds["id"].tolist() == reference["id"].tolist()
    bad = preds.loc[[1, 3]]
    assert (bad["pred"] == "").all() and (bad["prob_0"] == "").all()
    assert (bad["weight_labs"] == "").all()
    assert bad["reason"].iloc[0] == "no modality present"
    assert "gone.png does not exist" in bad["reason"].iloc[1]
    # Everyone else is scored exactly as in the untouched file.
    good = preds.drop(index=[1, 3])
    assert (good["reason"] == "").all()
    pd.testing.assert_frame_equal(good, reference.drop(index=[1, 3]))
    assert f"predictions ({N_PATIENTS} patients, 2 not scored, first 20 shown)" in flat(
        result.output
    )


def test_predict_fails_only_when_no_patient_can_be_scored(trained_run: Run, tmp_path: Path) -> None:
    patients = tmp_path / "patients.csv"
    patients.write_text("id,labs,us,text\nA1,,,\nA2,,us/none.png,\n", encoding="utf-8")
    out = tmp_path / "predictions.csv"
    result = invoke("predict", patients, "--run", trained_run[0], "--out", out, "--device", "cpu")
    assert result.exit_code == 2, result.output
    message = flat(result.stderr)
    assert (
        "none of the 2 patient(s) can be scored: row 2 (id A1): no modality present; "
        "row 3 (id A2): row 3, column 'us': image" in message
    )
    assert "Traceback" not in result.output and not out.exists()


@pytest.fixture(scope="module")
def labs_table_run(
    tiny_manifest: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """A run trained with --labs-table: the tiny cohort's labs moved to labs_table.csv."""
    root = tmp_path_factory.mktemp("labs_table")
    data = Path(shutil.copytree(tiny_manifest.parent, root / "data"))
    frame = read(data / "manifest.csv")
    rows = [
        [pid, *json.loads(cell)]
        for pid, cell in zip(frame["id"], frame["labs"], strict=True)
        if cell
    ]
    table = pd.DataFrame(rows, columns=["pid", *(f"a{k}" for k in range(5))])
    table.to_csv(data / "labs_table.csv", index=False)
    frame["labs"] = ""
    frame.to_csv(data / "manifest.csv", index=False)
    run = root / "run"
    run_training(
        tiny_request(
            data / "manifest.csv", run, labs_table=str(data / "labs_table.csv"), labs_id_col="pid"
        )
    )
    return {"run": run, "manifest": data / "manifest.csv", "table": data / "labs_table.csv"}


def test_predict_names_the_labs_table_a_run_was_trained_with(
    labs_table_run: dict[str, Path], tmp_path: Path
) -> None:
    run, manifest, table = (labs_table_run[k] for k in ("run", "manifest", "table"))
    out = tmp_path / "predictions.csv"
    result = invoke("predict", manifest, "--run", run, "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output + result.stderr
    stderr = flat(result.stderr)
    flags = f"this run was trained with --labs-table {table.resolve()} --labs-id-col pid"
    assert flags in stderr
    assert "pass --labs-table LABS.csv --labs-id-col pid" in stderr
    assert f"labs come from the manifest's 'labs' column (0 of {N_PATIENTS} patients" in stderr
    labs_only = [i for i in range(N_PATIENTS) if i % 8 == 5]  # conftest's presence cycle
    preds = read(out)
    assert preds.index[preds["pred"] == ""].tolist() == labs_only
    assert all(
        r.startswith(f"no modality present ({flags}") for r in preds.loc[labs_only, "reason"]
    )
    with_table = invoke(
        "predict",
        manifest,
        "--run",
        run,
        "--out",
        out,
        "--device",
        "cpu",
        "--labs-table",
        table,
        "--labs-id-col",
        "pid",
    )
    assert with_table.exit_code == 0 and "warning" not in with_table.stderr
    assert (read(out)["reason"] == "").all()


def test_evaluate_excludes_patients_without_a_modality_and_says_so(
    labs_table_run: dict[str, Path], tmp_path: Path
) -> None:
    run, manifest = labs_table_run["run"], labs_table_run["manifest"]
    result = invoke(
        "evaluate",
        run,
        "--manifest",
        manifest,
        "--out-dir",
        tmp_path / "ev",
        "--device",
        "cpu",
        "--bootstrap",
        0,
    )
    assert result.exit_code == 0, result.output + result.stderr
    output = flat(result.output)
    labs_only = [i for i in range(N_PATIENTS) if i % 8 == 5]
    assert (
        f"{len(labs_only)} patient(s) have no modality and are not scored: "
        "row 7 (id 0000001006), row 15 (id 0000001014), row 23 (id 0000001022), "
        "row 31 (id 0000001030) (this run was trained with --labs-table"
    ) in output
    assert "--labs-table" in output and "--labs-id-col pid" in output
    n = N_PATIENTS - len(labs_only)
    assert f"({n} patients)" in output
    assert len(read(tmp_path / "ev" / "predictions.csv")) == n


# -- help texts -------------------------------------------------------------------------------


def _commands() -> dict[str, Any]:
    import typer

    return typer.main.get_command(app).commands  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(_commands()))
def test_help_shows_every_help_text_whole(name: str) -> None:
    """rich reads `[default: ...]` as markup and drops it ("Run directory to use ."): every
    help text must come out as written, and every default be shown."""
    result = invoke(name, "--help", width=1000)
    assert result.exit_code == 0, result.output
    output = flat(result.output)
    assert not re.search(r"\s[.,;](\s|$)", output), "text dropped before a full stop"
    for param in _commands()[name].params:
        if getattr(param, "help", None):
            assert flat(param.help) in output, (name, param.name)


def test_help_shows_the_defaults() -> None:
    cases = {
        "predict": [
            "Run directory to use. [default: (the newest run under ./runs)]",
            "Id column of --labs-table. [default: (id; evaluate and predict: the run's)]",
            "[default: predictions.csv]",
            "[default: 32]",
        ],
        "train": [
            "[default: (runs/run-YYYYmmdd-HHMMSS)]",
            "[default: resnet34]",
            "[default: (labs=vector us=image text=text)]",
            "[default: (auto: 30, fewer past 20,000 training patients)]",
        ],
        "evaluate": ["[default: (RUN_DIR/eval/<test|manifest>)]", "[default: 1000]"],
        "check": ["[default: (from the data)]"],
        "cv": ["[default: 5]"],
    }
    for name, fragments in cases.items():
        output = flat(invoke(name, "--help", width=1000).output)
        for fragment in fragments:
            assert fragment in output, (name, fragment)


# -- file modes -------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_run_files_follow_the_umask(tiny_manifest: Path, tmp_path: Path, umask: int) -> None:
    """Atomic writes used to leave every run file 0600 (mkstemp's mode): a colleague in the
    group could not read a shared run's metrics."""
    from omnifuse_cli.engine.files import write_csv
    from omnifuse_cli.engine.prediction import PredictRequest, predict_patients

    old = os.umask(umask)
    try:
        run = tmp_path / "run"
        run_training(tiny_request(tiny_manifest, run, epochs=1))
        result = predict_patients(PredictRequest(run_dir=run, patients=tiny_manifest, device="cpu"))
        write_csv(tmp_path / "predictions.csv", result.frame)
    finally:
        os.umask(old)
    files = [p for p in run.rglob("*") if p.is_file()] + [tmp_path / "predictions.csv"]
    assert {"model.safetensors", "bundle.json", "metrics.csv", "meta.csv", "checkpoint.pt"} <= {
        p.name for p in files
    }
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
    assert not [p for p in run.rglob("*.tmp")]


# -- split summary and table titles -----------------------------------------------------------


def expected_split_rows(
    manifest: Path, ratios: tuple[float, float, float], seed: int
) -> dict[str, list[int]]:
    """Patients per class / presence pattern in train, val, test, all, counted independently
    of the engine's summary (from the manifest's cells and the split function)."""
    from omnifuse_cli.data.splits import stratified_split

    frame = read(manifest)
    labels = frame["label"].astype(int).to_numpy()
    splits = stratified_split(labels, train=ratios[0], val=ratios[1], test=ratios[2], seed=seed)
    pattern = np.array(
        [
            "+".join(m for m in ("labs", "us", "text") if row[m].strip())
            for _, row in frame.iterrows()
        ]
    )
    keys = {f"class {c}": labels == c for c in range(3)}
    keys.update({p: pattern == p for p in sorted(set(pattern))})
    return {
        key: [int(mask[splits[s]].sum()) for s in ("train", "val", "test")] + [int(mask.sum())]
        for key, mask in keys.items()
    }


def assert_split_table(output: str, expected: dict[str, list[int]]) -> None:
    assert "patients per split, by class and missing pattern" in output
    for key, counts in expected.items():
        cells = r"\s*│\s*".join(str(n) for n in counts)
        assert re.search(rf"│ {re.escape(key)}\s*│\s*{cells}\s*│", output), (key, counts)


def test_check_prints_the_split_summary(tiny_manifest: Path) -> None:
    result = invoke(
        "check",
        tiny_manifest,
        "--num-classes",
        3,
        "--train-ratio",
        0.6,
        "--val-ratio",
        0.2,
        "--test-ratio",
        0.2,
        "--seed",
        3,
    )
    assert result.exit_code == 0, result.output
    expected = expected_split_rows(tiny_manifest, (0.6, 0.2, 0.2), 3)
    assert len(expected) == 3 + 7  # three classes, seven presence patterns
    assert_split_table(result.output, expected)


def test_train_prints_and_writes_the_split_summary(tiny_manifest: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = invoke(
        "train",
        tiny_manifest,
        "--out-dir",
        run,
        "--num-classes",
        3,
        "--epochs",
        1,
        "--image-backbone",
        "resnet18",
        "--image-size",
        32,
        "--device",
        "cpu",
        "--no-pretrained-image",
        "--train-ratio",
        0.6,
        "--val-ratio",
        0.2,
        "--test-ratio",
        0.2,
        "--seed",
        0,
        "--no-cache",
    )
    assert result.exit_code == 0, result.output
    expected = expected_split_rows(tiny_manifest, (0.6, 0.2, 0.2), 0)
    assert_split_table(result.output, expected)
    written = read(run / "splits_summary.csv")
    assert list(written.columns) == ["kind", "value", "train", "val", "test", "total"]
    as_rows = {
        (f"class {v}" if k == "class" else v): [int(n) for n in rest]
        for k, v, *rest in written.itertuples(index=False)
    }
    assert as_rows == expected


@pytest.mark.parametrize("width", [40, 60])
def test_table_titles_stay_whole_on_a_narrow_terminal(width: int) -> None:
    from io import StringIO

    from rich.console import Console

    from omnifuse_cli.cli.render import confusion_table, counts_table, metrics_table

    tables = {
        "test metrics (best checkpoint)": metrics_table(
            {"acc": 0.5}, "test metrics (best checkpoint)"
        ),
        "patients per class": counts_table({"0": 3}, "patients per class"),
        "confusion matrix (rows = true)": confusion_table(
            np.eye(2), ["0", "1"], "confusion matrix (rows = true)"
        ),
    }
    for title, table in tables.items():
        buffer = StringIO()
        Console(file=buffer, width=width, force_terminal=False).print(table)
        assert title in buffer.getvalue().splitlines()[0], buffer.getvalue()
