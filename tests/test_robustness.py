"""Issue 3, "a clear error for every malformed input, nothing lost".

Through the real command line (typer's CliRunner, and a subprocess for Ctrl-C): every kind of
malformed input exits 2 with a message naming the file, the row as a spreadsheet shows it, the
column and the bad value, never a traceback; Ctrl-C leaves a usable run that `--resume` finishes
exactly like an uninterrupted run; same-seed runs are identical; `omnifuse check` describes a
cohort or lists all its problems at once; and no command clobbers or unpickles what it finds.

The cohort is the conftest's tiny one (patient i has id 1001+i, label i % 3 and sits on
spreadsheet row i + 2); every test edits its own copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from omnifuse_cli.config import DEFAULT_MODALITIES
from omnifuse_cli.data.manifest import read_manifest
from omnifuse_cli.engine.training import TrainResult, run_training
from omnifuse_cli.errors import ManifestError, TrainingInterrupted

from .conftest import N_PATIENTS, tiny_request
from .helpers import assert_ok, assert_user_error, invoke

Run = tuple[Path, TrainResult]
MODEL_ARGS = [
    "--image-backbone",
    "resnet18",
    "--image-size",
    "32",
    "--device",
    "cpu",
    "--no-pretrained-image",
]
RATIOS = ["--train-ratio", "0.6", "--val-ratio", "0.2", "--test-ratio", "0.2"]


def train_args(epochs: int = 1, seed: int = 0) -> list[str]:
    """Options for a fast `omnifuse train` of the tiny cohort (30 patients, 3 classes)."""
    return [
        "--num-classes",
        "3",
        "--epochs",
        str(epochs),
        *MODEL_ARGS,
        *RATIOS,
        "--seed",
        str(seed),
    ]


def squash(text: str) -> str:
    """Text without any whitespace: undoes rich's wrapping (and folding of long paths)."""
    return "".join(text.split())


def row(i: int) -> int:
    """Spreadsheet row of patient i of the tiny cohort (the header is row 1)."""
    return i + 2


def where(manifest: Path, i: int) -> str:
    """How messages name patient i of a manifest: its spreadsheet row and its (normalised) id."""
    from omnifuse_cli.data.tables import normalize_id

    ids = pd.read_csv(manifest, dtype=str, keep_default_na=False)["id"]
    return f"row {row(i)} (id {normalize_id(ids[i])})"


@pytest.fixture
def data(tiny_manifest: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny cohort; returns its manifest.csv."""
    return Path(shutil.copytree(tiny_manifest.parent, tmp_path / "data")) / "manifest.csv"


def read(manifest: Path) -> pd.DataFrame:
    return pd.read_csv(manifest, dtype=str, keep_default_na=False)


def write(frame: pd.DataFrame, manifest: Path) -> Path:
    frame.to_csv(manifest, index=False)
    return manifest


def edit(manifest: Path, i: int, column: str, value: str) -> Path:
    frame = read(manifest)
    frame.loc[i, column] = value
    return write(frame, manifest)


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: relative path -> (sha256, mtime_ns)."""
    return {
        str(p.relative_to(folder)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def copy_run(run_dir: Path, dest: Path) -> Path:
    return Path(shutil.copytree(run_dir, dest))


# == 1. the CLI error path ====================================================================


@pytest.mark.parametrize("kind", ["binary", "empty"])
def test_manifest_that_is_not_a_csv(data: Path, tmp_path: Path, kind: str) -> None:
    png = data.parent / "us" / "1001_0.png"
    data.write_bytes(png.read_bytes() if kind == "binary" else b"")
    expected = "is a binary file, not a CSV" if kind == "binary" else "is empty"
    result = invoke("train", data, "--out-dir", tmp_path / "run", *train_args())
    assert_user_error(result, f"manifest {data} {expected}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("column", "expected"),
    [
        ("id", "has no 'id' column (columns: label, labs, us, text)"),
        ("label", "has no 'label' column"),
        ("us", "lacks column(s) us (columns: id, label, labs, text)"),
    ],
)
def test_required_column_missing(data: Path, tmp_path: Path, column: str, expected: str) -> None:
    write(read(data).drop(columns=[column]), data)
    result = invoke("train", data, "--out-dir", tmp_path / "run", *train_args())
    # The message names the manifest: with --labs-table (or predict's run) there are two CSVs.
    assert_user_error(result, expected, str(data))


def test_duplicate_ids(data: Path, tmp_path: Path) -> None:
    edit(data, 3, "id", "01001")  # the same patient as row 2 once zero-padded
    result = invoke("train", data, "--out-dir", tmp_path / "run", *train_args())
    assert_user_error(
        result,
        str(data),
        "row 5 (id 0000001001), column 'id': duplicate id '0000001001' (first at row 2)",
    )


def test_labels_that_are_not_integers_are_all_listed(data: Path, tmp_path: Path) -> None:
    edit(data, 4, "label", "abc")
    edit(data, 6, "label", "1.5")
    result = invoke("train", data, "--out-dir", tmp_path / "run", *train_args())
    assert_user_error(
        result,
        str(data),
        "(2 problem(s))",
        "row 6 (id 0000001005), column 'label': 'abc' is not an integer class",
        "row 8 (id 0000001007), column 'label': '1.5' is not an integer class",
    )


@pytest.mark.parametrize(
    "ratios",
    [RATIOS, ["--train-ratio", "0.8", "--val-ratio", "0.1", "--test-ratio", "0.1"]],
    ids=["60-20-20", "80-10-10"],
)
def test_class_too_small_to_stratify(data: Path, tmp_path: Path, ratios: list[str]) -> None:
    # Class 2 keeps two patients: it cannot have one in each of train, val and test.
    frame = read(data)
    twos = frame.index[frame["label"] == "2"][2:]
    frame.loc[twos, "label"] = ["0", "1"] * (len(twos) // 2)
    assert frame["label"].value_counts().to_dict() == {"0": 14, "1": 14, "2": 2}
    write(frame, data)
    args = ["--num-classes", "3", "--epochs", "1", *MODEL_ARGS, *ratios, "--seed", "0"]
    result = invoke("train", data, "--out-dir", tmp_path / "run", *args)
    assert_user_error(result, "class 2 has 2 patient(s)", "add patients to class 2")


def break_images(data: Path) -> dict[int, tuple[Path, str]]:
    """Missing, random bytes, truncated and text-as-PNG: one file each of patients 0, 1, 3, 4
    (each keeps another modality). Returns patient -> (file, expected problem)."""
    us = data.parent / "us"
    raw = (us / "1004_0.png").read_bytes()
    (us / "1001_0.png").unlink()
    (us / "1002_0.png").write_bytes(np.random.default_rng(0).bytes(2000))
    (us / "1004_0.png").write_bytes(raw[: len(raw) // 2])
    (us / "1005_0.png").write_text("not an image at all", encoding="utf-8")
    unsupported = "is not an image in a supported format"
    return {
        0: (us / "1001_0.png", "does not exist"),
        1: (us / "1002_0.png", unsupported),
        3: (us / "1004_0.png", "is corrupt or truncated"),
        4: (us / "1005_0.png", unsupported),
    }


def test_unreadable_images_are_all_listed_in_one_message(data: Path, tmp_path: Path) -> None:
    broken = break_images(data)
    result = invoke("train", data, "--out-dir", tmp_path / "run", *train_args())
    fragments = [
        f"{where(data, i)}, column 'us': image {path} {problem}"
        for i, (path, problem) in broken.items()
    ]
    assert_user_error(result, str(data), "(4 problem(s))", *fragments, "hint: ")
    assert not (tmp_path / "run").exists()


def test_on_bad_file_skip_trains_anyway_and_says_what_it_skipped(
    data: Path, tmp_path: Path
) -> None:
    broken = break_images(data)
    run = tmp_path / "run"
    result = invoke("train", data, "--out-dir", run, *train_args(), "--on-bad-file", "skip")
    assert_ok(result)
    output = squash(result.output)
    assert squash("skipped 4 unreadable us image(s) (--on-bad-file skip)") in output
    for i, (path, problem) in broken.items():
        assert squash(f"{where(data, i)}: {path} {problem}") in output
    split = pd.read_csv(run / "split.csv")
    assert split["n"].sum() == N_PATIENTS  # every patient kept, only the bad files dropped
    assert (run / "model" / "model.safetensors").is_file()


class Payload:
    """Runs print('pwned') if anyone ever unpickles it."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (print, ("pwned",))


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("shape", "1001.npy has shape (3, 3); a 1-D vector is needed"),
        ("str", "1001.npy has dtype <U1; numbers are needed"),
        ("bool", "1001.npy has dtype bool; numbers are needed"),
        ("complex", "value 1 ((1+2j)) is not a number"),
        ("object", "1001.npy is not a readable .npy array (Object arrays cannot be loaded"),
        ("empty", "1001.npy is not a readable .npy array"),
    ],
)
def test_npy_vectors_that_are_not_numbers(
    data: Path, tmp_path: Path, kind: str, expected: str
) -> None:
    path = data.parent / "labs" / "1001.npy"
    path.parent.mkdir()
    arrays = {
        "shape": np.ones((3, 3)),
        "str": np.array(list("abcde")),
        "bool": np.array([True, False, True, False, True]),
        "complex": np.array([1 + 2j, 2, 3, 4, 5]),
        "object": np.array([Payload(), 2, 3, 4, 5], dtype=object),
    }
    if kind == "empty":
        path.write_bytes(b"")  # an export that died before writing anything
    else:
        np.save(path, arrays[kind], allow_pickle=True)
    edit(data, 0, "labs", "labs/1001.npy")
    result = invoke("train", data, "--out-dir", tmp_path / "run", *train_args())
    assert_user_error(result, str(data), f"row 2 (id 0000001001), column 'labs': {expected}")
    assert "pwned" not in result.output  # allow_pickle=False: the payload is never unpickled


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("[1, 2, 3, 4]", "vector has 4 values, most rows have 5"),
        ('[1, "x", 3, 4, 5]', "value 2 ('x') is not a number"),
        ("[1, Infinity, 3, 4, 5]", "value 2 is infinite"),
        ("labs/1003.csv", "value 2 is infinite"),
        ("[1, inf, 3, 4, 5]", "inf"),
    ],
    ids=["length", "non-numeric", "Infinity", "inf-in-csv-file", "bare-inf"],
)
def test_bad_lab_vectors(data: Path, tmp_path: Path, cell: str, expected: str) -> None:
    (data.parent / "labs").mkdir()
    (data.parent / "labs" / "1003.csv").write_text("1,inf,3,4,5\n", encoding="utf-8")
    edit(data, 2, "labs", cell)
    result = invoke("train", data, "--out-dir", tmp_path / "run", *train_args())
    where = "row 4 (id 0000001003), column 'labs': "
    lines = assert_user_error(result, str(data), where)
    line = next(x for x in lines if where in x)
    # The bad value itself (or what is wrong with it) is named, not only a parser position.
    assert expected in line.split(where, 1)[1], line


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (
            "pid,ALT,AST\n1001,1,2\n",
            ["has no id column 'id' (columns: pid, ALT, AST)", "--labs-id-col"],
        ),
        ("id,ALT,AST\n1001,1,2\n01001,3,4\n", ["has duplicate ids: 0000001001"]),
        ("id,ALT,AST\n5,1,2\n6,3,4\n", [f"matches none of the {N_PATIENTS} manifest ids"]),
        (
            "id,ALT,AST\n1001,1,2\n1002,3,abc\n",
            ["row 3 (id 0000001002), column 'AST'", "'abc' is not a number"],
        ),
        ("id,ALT,AST\n1001,inf,2\n", ["row 2 (id 0000001001), column 'ALT'", "is infinite"]),
    ],
    ids=["no-id-column", "duplicate-ids", "no-match", "non-numeric", "inf"],
)
def test_bad_labs_table(data: Path, tmp_path: Path, table: str, expected: list[str]) -> None:
    path = data.parent / "labs_table.csv"
    path.write_text(table, encoding="utf-8")
    result = invoke(
        "train", data, "--labs-table", path, "--out-dir", tmp_path / "run", *train_args()
    )
    assert_user_error(result, str(path), *expected)


def test_a_note_in_gb18030_is_read(data: Path) -> None:
    note_path = data.parent / "notes" / "1002.txt"
    note = note_path.read_text(encoding="utf-8")
    encoded = note.encode("gb18030")
    with pytest.raises(UnicodeDecodeError):
        encoded.decode("utf-8")  # really not UTF-8
    note_path.write_bytes(encoded)
    result = invoke("check", data, "--num-classes", 3, *RATIOS)
    assert_ok(result)
    assert "ok: 30 patients" in " ".join(result.output.split())
    cohort = read_manifest(data, DEFAULT_MODALITIES)
    assert cohort.texts["text"][1] == note


def test_a_note_of_invalid_bytes(data: Path, tmp_path: Path) -> None:
    garbage = b"\xff\xfe\xfa" * 10
    for encoding in ("utf-8-sig", "gb18030"):
        with pytest.raises(UnicodeDecodeError):
            garbage.decode(encoding)
    note_path = data.parent / "notes" / "1002.txt"
    note_path.write_bytes(garbage)
    result = invoke("train", data, "--out-dir", tmp_path / "run", *train_args())
    assert_user_error(
        result,
        str(data),
        f"row 3 (id 0000001002), column 'text': note file "
        f"{note_path} is not text in utf-16: it decodes to the character U+",
    )


def test_a_patient_with_no_modality(data: Path, tmp_path: Path) -> None:
    for column in ("labs", "us", "text"):
        edit(data, 1, column, "")
    result = invoke(
        "train", data, "--out-dir", tmp_path / "run", *train_args(), "--on-empty-patient", "error"
    )
    assert_user_error(
        result,
        str(data),
        "1 patient(s) have no modality at all: row 3 (id 0000001002)",
        "--on-empty-patient skip",
    )
    # By default the patient is left out, said once, and recorded as excluded.
    result = invoke("train", data, "--out-dir", tmp_path / "run", *train_args())
    assert_ok(result)
    assert (
        "left out 1 patient(s) with no modality at all (--on-empty-patient skip): row 3 "
        "(id 0000001002)"
    ) in " ".join(result.output.split())
    assignment = pd.read_csv(tmp_path / "run" / "split_assignment.csv", dtype={"id": str})
    assert assignment.loc[assignment["split"] == "excluded", "id"].tolist() == ["0000001002"]
    assert len(assignment) == 30
    split = pd.read_csv(tmp_path / "run" / "split.csv")
    assert dict(zip(split["split"], split["n"], strict=True))["excluded"] == 1
    checked = invoke("check", data, "--num-classes", "3")
    assert_ok(checked)
    assert "left out 1 patient(s)" in " ".join(checked.output.split())


def test_vscode_links(data: Path, tmp_path: Path) -> None:
    result = invoke(
        "train", "http://_vscodecontentref_/0", "--out-dir", tmp_path / "run", *train_args()
    )
    assert_user_error(result, "is a VS Code link, not a file path", "hint: ", "_vscodecontentref_")
    edit(data, 3, "us", "http://_vscodecontentref_/5")
    result = invoke("train", data, "--out-dir", tmp_path / "run", *train_args())
    assert_user_error(
        result,
        str(data),
        "row 5 (id 0000001004), column 'us': 'http://_vscodecontentref_/5' is a VS Code link",
    )


def test_predict_with_a_different_lab_panel(trained_run: Run, tmp_path: Path) -> None:
    patients = tmp_path / "new_patients.csv"
    patients.write_text('id,labs,us,text\n1,"[1, 2, 3, 4]",,结节\n', encoding="utf-8")
    out = tmp_path / "predictions.csv"
    result = invoke("predict", patients, "--run", trained_run[0], "--out", out, "--device", "cpu")
    assert_user_error(
        result, "labs has 4 values per patient, the model was trained on 5", str(patients)
    )
    assert not out.exists()


def test_folders_that_are_not_runs(tmp_path: Path, tiny_manifest: Path, trained_run: Run) -> None:
    folder = tmp_path / "not_a_run"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello", encoding="utf-8")
    out = tmp_path / "predictions.csv"
    result = invoke("predict", tiny_manifest, "--run", folder, "--out", out, "--device", "cpu")
    assert_user_error(result, f"{folder} is not an omnifuse run", "hint: ")
    assert not out.exists()
    assert_user_error(
        invoke("train", "--resume", folder), f"{folder} is not a resumable run (no request.json)"
    )
    no_checkpoint = copy_run(trained_run[0], tmp_path / "no_checkpoint")
    (no_checkpoint / "checkpoint.pt").unlink()
    assert_user_error(
        invoke("train", "--resume", no_checkpoint), "has no checkpoint.pt: no epoch was completed"
    )
    damaged = copy_run(trained_run[0], tmp_path / "damaged")
    (damaged / "request.json").write_text('{"manifest": ', encoding="utf-8")
    assert_user_error(
        invoke("train", "--resume", damaged), f"{damaged / 'request.json'} is damaged"
    )


@pytest.mark.parametrize("command", ["predict", "evaluate"])
@pytest.mark.parametrize("damage", ["garbage-safetensors", "format-999"])
def test_broken_bundles(
    trained_run: Run, tiny_manifest: Path, tmp_path: Path, command: str, damage: str
) -> None:
    run = copy_run(trained_run[0], tmp_path / "run")
    before = snapshot(run)
    if damage == "garbage-safetensors":
        (run / "model" / "model.safetensors").write_bytes(b"garbage, not safetensors" * 10)
        expected = [
            f"{run / 'model' / 'model.safetensors'} is missing or corrupted",
            "hint: re-run training",
        ]
    else:
        path = run / "model" / "bundle.json"
        meta = json.loads(path.read_text(encoding="utf-8"))
        meta["format_version"] = 999
        path.write_text(json.dumps(meta), encoding="utf-8")
        expected = [
            "bundle format 999 is newer than this omnifuse understands",
            "hint: upgrade omnifuse",
        ]
    if command == "predict":
        args = ["predict", tiny_manifest, "--run", run, "--out", tmp_path / "p.csv"]
    else:
        args = ["evaluate", run]
    assert_user_error(invoke(*args, "--device", "cpu"), *expected)
    assert not (tmp_path / "p.csv").exists() and not (run / "eval").exists()
    after = snapshot(run)
    assert {k for k in before if before[k] != after.get(k)} <= {
        "model/model.safetensors",
        "model/bundle.json",
    }


@pytest.mark.parametrize(
    ("value", "debug"), [("1", True), ("yes", True), ("0", False), ("", False)]
)
def test_omnifuse_debug_env_shows_the_traceback(tmp_path: Path, value: str, debug: bool) -> None:
    result = invoke("train", tmp_path / "nope.csv", *train_args(), env={"OMNIFUSE_DEBUG": value})
    if debug:
        assert isinstance(result.exception, ManifestError), repr(result.exception)
        assert result.exit_code == 1
        trace = "".join(traceback.format_exception(*result.exc_info))
        assert "Traceback" in trace and "read_table" in trace and "nope.csv" in trace
    else:
        assert_user_error(result, "nope.csv does not exist")


# == 2. Ctrl-C and --resume ===================================================================

EPOCHS = 40  # ~0.1-0.3 s each with the saves: Ctrl-C after epoch 2 lands well before the end


def read_metrics(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "metrics.csv", dtype=str, keep_default_na=False)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX-only")
def test_ctrl_c_leaves_a_usable_run_and_resume_equals_an_uninterrupted_run(
    tiny_manifest: Path, tmp_path: Path
) -> None:
    interrupted, uninterrupted = tmp_path / "R", tmp_path / "U"
    args = [tiny_manifest, "--out-dir", interrupted, *train_args(EPOCHS)]
    # One intra-op thread, like the in-process runs below (conftest), so floats match exactly.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with stdout.open("w") as out, stderr.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "omnifuse_cli", "train", *map(str, args)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            cwd=tmp_path,
            # A shell's background job (`.ci/run &`) inherits SIGINT ignored, and Python then
            # never raises KeyboardInterrupt: give the child the default, as a terminal would.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            deadline = time.monotonic() + 180
            while proc.poll() is None and time.monotonic() < deadline:
                metrics = interrupted / "metrics.csv"
                if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                    break
                time.sleep(0.02)
            assert proc.poll() is None, "training ended before it could be interrupted:\n" + (
                stderr.read_text() + stdout.read_text()
            )
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    err_text = stderr.read_text()
    assert code == 130, err_text + stdout.read_text()
    assert "Traceback" not in err_text
    assert any(line.startswith("interrupted: ") for line in err_text.splitlines()), err_text
    assert f"--resume {interrupted}" in err_text

    # Everything up to the last complete epoch is on disk, and the run is usable as it is.
    done = read_metrics(interrupted)
    k = len(done)
    assert 2 <= k < EPOCHS
    assert done["epoch"].tolist() == [str(e) for e in range(1, k + 1)]
    for name in (
        "model/bundle.json",
        "model/model.safetensors",
        "checkpoint.pt",
        "request.json",
        "split_assignment.csv",
    ):
        assert (interrupted / name).is_file(), name
    checkpoint = torch.load(interrupted / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] in (k - 1, k)  # k - 1 when Ctrl-C hit while it was being saved
    preds = tmp_path / "interrupted_predictions.csv"
    assert_ok(
        invoke("predict", tiny_manifest, "--run", interrupted, "--out", preds, "--device", "cpu")
    )
    assert len(pd.read_csv(preds)) == N_PATIENTS

    resumed = invoke("train", "--resume", interrupted)
    assert_ok(resumed)
    assert squash(f"resuming {interrupted}") in squash(resumed.output)
    assert read_metrics(interrupted)["epoch"].tolist() == [str(e) for e in range(1, EPOCHS + 1)]

    assert_ok(invoke("train", tiny_manifest, "--out-dir", uninterrupted, *train_args(EPOCHS)))
    pd.testing.assert_frame_equal(
        read_metrics(interrupted).drop(columns=["seconds"]),
        read_metrics(uninterrupted).drop(columns=["seconds"]),
    )
    for name in ("test.csv", "confusion_matrix.csv", "split_assignment.csv"):
        assert (interrupted / name).read_text() == (uninterrupted / name).read_text(), name


def interrupt_while_saving_checkpoint(
    monkeypatch: pytest.MonkeyPatch, out: Path, manifest: Path
) -> TrainingInterrupted:
    """Train 3 epochs; Ctrl-C arrives while epoch 2's checkpoint is half written."""
    real_save = torch.save
    calls: list[object] = []

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(f)
        if len(calls) == 2:
            Path(f).write_bytes(b"half a checkpoint")
            raise KeyboardInterrupt
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(TrainingInterrupted, match=r"training stopped during epoch") as info:
        run_training(tiny_request(manifest, out, epochs=3))
    monkeypatch.undo()
    assert len(calls) == 2
    return info.value


def test_ctrl_c_while_saving_the_checkpoint_keeps_the_previous_one(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    interrupt_while_saving_checkpoint(monkeypatch, out, tiny_manifest)
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1  # the atomic write kept epoch 1's complete checkpoint
    leftovers = [p.name for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == [], f"a half-written temporary file was left behind: {leftovers}"


def test_ctrl_c_while_saving_the_checkpoint_reports_what_was_saved(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    error = interrupt_while_saving_checkpoint(monkeypatch, out, tiny_manifest)
    saved = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["epoch"]
    # --resume continues after the checkpoint's epoch: the message must not promise more.
    assert f"; {saved} epoch(s) are complete and saved" in error.message, error.message


# == 3. determinism ===========================================================================


@pytest.fixture(scope="module")
def seed0_run(tiny_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("determinism") / "a"
    assert_ok(invoke("train", tiny_manifest, "--out-dir", run, *train_args(3, seed=0)))
    return run


def test_same_seed_gives_identical_metrics_and_predictions(
    seed0_run: Path, tiny_manifest: Path, tmp_path: Path
) -> None:
    again = tmp_path / "b"
    assert_ok(invoke("train", tiny_manifest, "--out-dir", again, *train_args(3, seed=0)))
    first, second = read_metrics(seed0_run), read_metrics(again)
    assert len(first) == 3
    pd.testing.assert_frame_equal(first.drop(columns=["seconds"]), second.drop(columns=["seconds"]))
    for name in ("split_assignment.csv", "test.csv"):
        assert (seed0_run / name).read_text() == (again / name).read_text(), name
    outputs = []
    for run in (seed0_run, again):
        out = tmp_path / f"predictions_{run.name}.csv"
        assert_ok(invoke("predict", tiny_manifest, "--run", run, "--out", out, "--device", "cpu"))
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1]
    assert len(pd.read_csv(tmp_path / "predictions_a.csv")) == N_PATIENTS


def test_another_seed_gives_another_split(
    seed0_run: Path, tiny_manifest: Path, tmp_path: Path
) -> None:
    other = tmp_path / "c"
    assert_ok(invoke("train", tiny_manifest, "--out-dir", other, *train_args(1, seed=1)))
    a = pd.read_csv(seed0_run / "split_assignment.csv", dtype=str)
    c = pd.read_csv(other / "split_assignment.csv", dtype=str)
    assert a["id"].tolist() == c["id"].tolist()
    assert a["split"].tolist() != c["split"].tolist()
    # Still stratified: 6/2/2 of each class.
    assert c.groupby(["split", "label"]).size().unstack().loc[
        ["train", "val", "test"]
    ].to_numpy().tolist() == [[6, 6, 6], [2, 2, 2], [2, 2, 2]]


# == 4. omnifuse check ========================================================================


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("made") / "data"
    assert_ok(invoke("make-data", "--out-dir", out, "--n", 30, "--image-size", 48))
    return out / "manifest.csv"


def table_row(*cells: object) -> re.Pattern[str]:
    """A rich table row holding exactly these cells, whatever the padding."""
    return re.compile(r"│\s*" + r"\s*│\s*".join(re.escape(str(c)) for c in cells) + r"\s*│")


def test_check_describes_a_cohort(made: Path) -> None:
    result = invoke("check", made, "--num-classes", 3)
    assert_ok(result)
    output = result.output
    frame = read(made)
    flat = " ".join(output.split())
    assert "30 patients by label" in flat
    for label, n in frame["label"].value_counts().items():
        assert table_row(label, n).search(output), (label, n)
    present = frame[["labs", "us", "text"]].apply(lambda c: c.str.strip() != "")
    assert "modalities" in flat
    for name in ("labs", "us", "text"):
        n = int(present[name].sum())
        assert table_row(name, n, f"{n / 30:.0%}").search(output), name
    assert "missing patterns (modalities present)" in flat
    patterns = present.apply(lambda r: "+".join(m for m in r.index if r[m]), axis=1)
    assert patterns.nunique() >= 3
    for pattern, n in patterns.value_counts().items():
        assert table_row(pattern, n).search(output), (pattern, n)
    assert f"ok: 30 patients, ready for `omnifuse train {made} --num-classes 3`" in flat


def test_check_lists_every_problem_of_a_broken_cohort(made: Path, tmp_path: Path) -> None:
    data = Path(shutil.copytree(made.parent, tmp_path / "data")) / "manifest.csv"
    frame = read(data)
    with_us = frame.index[frame["us"] != ""]
    gone_i, corrupt_i, label_i = int(with_us[0]), int(with_us[1]), int(frame.index[-1])
    gone = data.parent / frame.loc[gone_i, "us"].split(";")[0]
    corrupt = data.parent / frame.loc[corrupt_i, "us"].split(";")[0]
    gone.unlink()
    corrupt.write_bytes(np.random.default_rng(1).bytes(3000))
    edit(data, label_i, "label", "7")
    result = invoke("check", data, "--num-classes", 3)
    assert_user_error(
        result,
        str(data),
        "(3 problem(s))",
        f"{where(data, gone_i)}, column 'us': image {gone} does not exist",
        f"{where(data, corrupt_i)}, column 'us': image {corrupt} is not an image",
        f"{where(data, label_i)}, column 'label': 7 is outside 0..2 (--num-classes)",
    )


# == 5. nothing lost ==========================================================================


def test_an_existing_run_is_never_clobbered(
    trained_run: Run, tiny_manifest: Path, tmp_path: Path
) -> None:
    run = copy_run(trained_run[0], tmp_path / "run")
    before = snapshot(run)
    assert len(before) >= 10 and len(read_metrics(run)) == 2
    result = invoke("train", tiny_manifest, "--out-dir", run, *train_args())
    assert_user_error(
        result, f"--out-dir {run} already exists and is not empty", "hint: ", "--overwrite"
    )
    assert snapshot(run) == before
    # --overwrite with input that turns out bad still touches nothing.
    result = invoke("train", tmp_path / "nope.csv", "--out-dir", run, "--overwrite", *train_args())
    assert_user_error(result, "does not exist")
    assert snapshot(run) == before
    assert_ok(invoke("train", tiny_manifest, "--out-dir", run, "--overwrite", *train_args()))
    assert read_metrics(run)["epoch"].tolist() == ["1"]
    assert snapshot(run)["metrics.csv"] != before["metrics.csv"]


@pytest.fixture(params=["pickle-payload", "garbage"])
def poisoned_run(
    request: pytest.FixtureRequest, trained_run: Run, tmp_path: Path
) -> tuple[Path, Path]:
    """A copy of a run whose checkpoint.pt is a pickle that would print 'pwned' and create a
    marker file if unpickled (or plain garbage). Returns (run, marker)."""
    run = copy_run(trained_run[0], tmp_path / "run")
    marker = tmp_path / "payload_ran"
    if request.param == "pickle-payload":

        class Marker:
            def __reduce__(self) -> tuple[Any, tuple[str, str]]:
                return (open, (str(marker), "w"))

        torch.save({"epoch": 1, "x": Payload(), "y": Marker()}, run / "checkpoint.pt")
    else:
        (run / "checkpoint.pt").write_bytes(np.random.default_rng(2).bytes(4096))
    return run, marker


def test_a_poisoned_checkpoint_is_refused_and_never_run(
    poisoned_run: tuple[Path, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    run, marker = poisoned_run
    before = snapshot(run)
    result = invoke("train", "--resume", run)
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert "Traceback" not in result.output
    assert f"error: {run / 'checkpoint.pt'} is not a readable omnifuse checkpoint" in result.stderr
    assert "pwned" not in result.output and "pwned" not in capfd.readouterr().out
    assert not marker.exists()
    assert snapshot(run) == before


def test_a_poisoned_checkpoint_error_is_a_short_message(poisoned_run: tuple[Path, Path]) -> None:
    run, _ = poisoned_run
    assert_user_error(
        invoke("train", "--resume", run), "is not a readable omnifuse checkpoint", "hint: "
    )
