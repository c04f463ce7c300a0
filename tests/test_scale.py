"""Large-cohort machinery on tiny inputs: the vectorised manifest reader agrees with the
per-cell rules, the streamed vocabulary and compact token storage match the plain ones, and
long jobs write timestamped progress lines when nobody watches a terminal."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from omnifuse_cli.config import parse_modality_options
from omnifuse_cli.data import manifest, vectors
from omnifuse_cli.data.manifest import read_manifest
from omnifuse_cli.synthetic import CohortSpec, make_cohort

LABS_TEXT = parse_modality_options(["labs=vector", "text=text"])
NAN = math.nan


def edge_cohort(root: Path) -> tuple[Path, Path]:
    """Zero-padding, '8.0' ids, nulls, exponents, padded cells, a note file, a missing row in
    the labs table, an extra one and a 'nan' cell there."""
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "a.txt").write_text("短报告", encoding="utf-8")
    path = root / "manifest.csv"
    path.write_text(
        "id,label,labs,text\n"
        '7,0,"[1.5, null, 3]",inline note one\n'
        '8.0,1,"[ -2.25e1 ,0.1, 7 ]",notes/a.txt\n'
        "0009,2,,  padded note  \n"
        'P-10,1,"[4, 5, null]",\n'
        '11,0,"[1e-3, 2E+2, 0]",\n',
        encoding="utf-8",
    )
    table = root / "labs_table.csv"
    table.write_text(
        "id,WBC,PLT,ALT\n7,1.5,,3\n0000000008, 2.5 ,nan,1e2\n11,-1,0,  \n99,1,2,3\nP-10,,,4\n",
        encoding="utf-8",
    )
    return path, table


def same(a: np.ndarray, b: list[list[float]]) -> bool:
    return np.array_equal(a, np.array(b, dtype=np.float32), equal_nan=True)


def test_reader_edge_cases_give_the_per_cell_results(tmp_path: Path) -> None:
    path, table = edge_cohort(tmp_path)
    cohort = read_manifest(path, LABS_TEXT, num_classes=3)
    assert cohort.ids == ["0000000007", "0000000008", "0000000009", "P-10", "0000000011"]
    assert cohort.labels is not None and cohort.labels.tolist() == [0, 1, 2, 1, 0]
    assert cohort.present.tolist() == [
        [True, True],
        [True, True],
        [False, True],
        [True, False],
        [True, False],
    ]
    assert same(
        cohort.vectors["labs"],
        [
            [1.5, NAN, 3],
            [-22.5, np.float32(0.1), 7],
            [NAN] * 3,
            [4, 5, NAN],
            [np.float32(1e-3), 200, 0],
        ],
    )
    assert cohort.texts["text"] == ["inline note one", "短报告", "padded note", None, None]

    joined = read_manifest(path, LABS_TEXT, num_classes=3, labs_table=table)
    assert joined.vector_columns["labs"] == ["WBC", "PLT", "ALT"]
    assert same(
        joined.vectors["labs"],
        [[1.5, NAN, 3], [2.5, NAN, 100], [NAN] * 3, [NAN, NAN, 4], [-1, 0, NAN]],
    )
    assert joined.present[:, 0].tolist() == [True, True, False, True, True]
    assert joined.notes == [
        "labs table matched 4 of 5 manifest ids; the other 1 patients are treated as missing labs"
    ]


def test_fast_inline_parse_equals_the_per_cell_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    summary = make_cohort(
        CohortSpec(n=60, seed=2, ultrasound=False, inline_notes=True, labs_dim=24), tmp_path / "c"
    )
    fast = read_manifest(summary.manifest, LABS_TEXT, num_classes=3)
    monkeypatch.setattr(vectors, "_parse_inline_block", lambda cells: None)
    slow = read_manifest(summary.manifest, LABS_TEXT, num_classes=3)
    assert np.array_equal(fast.vectors["labs"], slow.vectors["labs"], equal_nan=True)
    assert np.isnan(fast.vectors["labs"]).any()  # nulls were in the cells
    assert np.array_equal(fast.present, slow.present)
    assert fast.texts == slow.texts and fast.ids == slow.ids


@pytest.mark.parametrize(
    "cell",
    [
        "[01, 2]",
        "[+1, 2]",
        "[.5, 2]",
        "[1, 2,]",
        "[1,, 2]",
        "[1e, 2]",
        "[Infinity, 2]",
        "[1e999, 2]",
        "[1, nul]",
        "[[1], 2]",
        "[]",
    ],
)
def test_cells_json_refuses_are_still_refused(tmp_path: Path, cell: str) -> None:
    """The fast parser hands anything unusual to json.loads, so the same cells fail."""
    path = tmp_path / "m.csv"
    path.write_text(f'id,label,labs\n1,0,"[3, 4]"\n2,1,"{cell}"\n', encoding="utf-8")
    with pytest.raises(manifest.ManifestError, match=r"row 3 .*column 'labs'"):
        read_manifest(path, LABS_TEXT[:1])


def test_duplicate_ids_in_a_long_labs_table_are_named(tmp_path: Path) -> None:
    rows = [f"{i},1.0" for i in range(5000)] + ["17,2.0", "4999,3.0"]
    (tmp_path / "t.csv").write_text("id,WBC\n" + "\n".join(rows) + "\n", encoding="utf-8")
    (tmp_path / "m.csv").write_text("id,label\n1,0\n", encoding="utf-8")
    with pytest.raises(manifest.ManifestError, match=r"duplicate ids: 0000000017, 0000004999$"):
        read_manifest(tmp_path / "m.csv", LABS_TEXT[:1], labs_table=tmp_path / "t.csv")


# ---------------------------------------------------------------------------------------------
# Vocabulary, compact tokens, batched dataset

NOTES = [
    "肝内见一低回声小结节，大小约1.2cm。",
    None,
    "",
    "CDFI: no flow 血流信号丰富",
    "肝脏形态大小正常，包膜光滑。肝脏形态大小正常。",
    "unknown 词汇 only",
    "随诊。",
]


@pytest.mark.parametrize("note_chunk", [65_536, 3, 1])  # one chunk, several, one note each
def test_streamed_vocabulary_and_compact_encoding_match_note_by_note(
    note_chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omnifuse_cli.data import text

    monkeypatch.setattr(text, "NOTE_CHUNK", note_chunk)

    listed = text.fit_vocabulary(NOTES, size=40, min_freq=1)
    streamed = text.fit_vocabulary((n for n in NOTES * 1), size=40, min_freq=1)
    assert streamed == listed
    vocab, idf = listed
    index = {t: i for i, t in enumerate(vocab)}
    new = NOTES + ["完全陌生的字"]
    ids, weights, offsets = text.encode_many(iter(new), index, idf, max_length=12)
    assert ids.dtype == np.int32 and weights.dtype == np.float32 and len(offsets) == len(new) + 1
    for k, note in enumerate(new):
        want_ids, want_weights = text.encode(note, index, idf, 12)
        assert ids[offsets[k] : offsets[k + 1]].tolist() == want_ids
        assert weights[offsets[k] : offsets[k + 1]].tolist() == (
            np.asarray(want_weights, dtype=np.float32).tolist()
        )
    assert offsets[2] == offsets[1] == offsets[3] - 0  # no note, empty note: empty rows


def test_ragged_round_trip_and_padded_batches() -> None:
    from omnifuse_cli.data.prepared import Ragged

    rows = [[3, 1, 2], [], [7], [5, 5, 5, 5]]
    store = Ragged.from_lists(rows, np.int32)
    assert len(store) == 4 and [r.tolist() for r in store] == rows
    assert [r.tolist() for r in store[1:3]] == [[], [7]]
    padded, mask = store.batch(np.array([3, 1, 0]), fill=-1)
    assert padded.tolist() == [[5, 5, 5, 5], [-1, -1, -1, -1], [3, 1, 2, -1]]
    assert mask.sum(axis=1).tolist() == [4, 0, 3]
    empty, mask = store.batch(np.array([1]))
    assert empty.shape == (1, 1) and not mask.any()


def test_batched_dataset_equals_the_per_patient_collate(tmp_path: Path) -> None:
    import torch

    from omnifuse_cli.config import ImageConfig, TextConfig
    from omnifuse_cli.data.cache import FeatureArray
    from omnifuse_cli.data.prepared import PatientDataset, Preprocessor, make_collate

    summary = make_cohort(
        CohortSpec(n=40, seed=3, ultrasound=False, inline_notes=True), tmp_path / "c"
    )
    cohort = read_manifest(summary.manifest, LABS_TEXT, num_classes=3)
    pre = Preprocessor.fit(cohort, ImageConfig(), TextConfig(max_length=16))
    data = pre.prepare(cohort)
    # An image modality with cached features (0-3 views per patient) rides along.
    sizes = [k % 4 for k in range(len(cohort))]
    data.names, data.kinds = [*data.names, "us"], [*data.kinds, "image"]
    data.present = torch.cat([data.present, torch.tensor(sizes).bool()[:, None]], dim=1)
    rows = np.random.default_rng(0).standard_normal((sum(sizes), 6)).astype(np.float32)
    data.image_cache["us"] = FeatureArray.from_rows(rows, sizes)
    data.image_feature_dims["us"] = 6

    picked = [5, 0, 17, 3, 39, 22]
    dataset = PatientDataset(data, np.arange(len(cohort)))
    fast = make_collate(data)(dataset.__getitems__(picked))
    slow = make_collate(data)([dataset[k] for k in picked])

    def flat(batch: dict, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {}
        for key, value in batch.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[prefix + key] = value
        return out

    fast_t, slow_t = flat(fast), flat(slow)
    assert sorted(fast_t) == sorted(slow_t)
    for key, value in slow_t.items():
        assert fast_t[key].dtype == value.dtype, key
        assert torch.equal(fast_t[key], value), key
    assert fast_t["inputs.text.weights"].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Progress in log files

STAMP = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] "


def test_train_writes_timestamped_progress_lines_without_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import re

    from typer.testing import CliRunner

    from omnifuse_cli.cli.app import app
    from omnifuse_cli.engine import training

    monkeypatch.setattr(training, "SLOW_STEP_SECONDS", 0.0)  # report every step's time

    summary = make_cohort(
        CohortSpec(n=60, seed=1, ultrasound=False, inline_notes=True), tmp_path / "c"
    )
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(summary.manifest),
            "--num-classes",
            "3",
            "--modality",
            "labs=vector",
            "--modality",
            "text=text",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--no-cache",
            "--out-dir",
            str(tmp_path / "run"),
        ],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    passes = [ln for ln in lines if re.match(STAMP + r"training: (\d+)/\1 \(100%\)", ln)]
    assert len(passes) == 2, result.output  # the end of each epoch's pass
    epochs = [ln for ln in lines if re.match(STAMP + r"epoch [12]\*? ", ln)]
    assert len(epochs) == 2, result.output
    # What happened before the first batch, with its time (at 1M patients: minutes).
    assert any(re.match(r"· " + STAMP + r"read 60 patients in \d+ s$", ln) for ln in lines)
    assert any(
        re.match(r"· " + STAMP + r"built the model and prepared the inputs", ln) for ln in lines
    ), result.output


def test_evaluate_and_predict_write_timestamped_pass_lines_without_a_terminal(
    tmp_path: Path,
) -> None:
    import re

    from typer.testing import CliRunner

    from omnifuse_cli.cli.app import app

    summary = make_cohort(
        CohortSpec(n=60, seed=1, ultrasound=False, inline_notes=True), tmp_path / "c"
    )
    run = tmp_path / "run"
    runner = CliRunner()
    trained = runner.invoke(
        app,
        [
            "train",
            str(summary.manifest),
            "--num-classes",
            "3",
            "--modality",
            "labs=vector",
            "--modality",
            "text=text",
            "--epochs",
            "1",
            "--no-cache",
            "--out-dir",
            str(run),
        ],
    )
    assert trained.exit_code == 0, trained.output
    for command in (
        [
            "predict",
            str(summary.manifest),
            "--run",
            str(run),
            "--out",
            str(tmp_path / "p.csv"),
            "--batch-size",
            "16",
        ],
        ["evaluate", str(run), "--batch-size", "4", "--bootstrap", "10"],
    ):
        result = runner.invoke(app, command, env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        done = [
            ln
            for ln in result.output.splitlines()
            if re.match(STAMP + r"scoring: (\d+)/\1 \(100%\)", ln)
        ]
        assert len(done) == 1, (command[0], result.output)


def test_plain_lines_are_rationed_within_a_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console
    from rich.table import Table

    from omnifuse_cli.cli import progress as module

    clock = iter(float(t) for t in range(0, 10_000, 10))
    monkeypatch.setattr(module.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    plain = module.PlainProgress(Console(file=out, width=200), Table("epoch"))
    task = plain.add_task("training", total=None)
    for done in range(1, 101):  # 10 s per batch: 30 s and 10% pass every 10 batches
        plain.update(task, description="training", completed=done, total=100)
    printed = out.getvalue().splitlines()
    assert len(printed) == 10 and printed[-1].endswith("training: 100/100 (100%), 1000.0 s")
    monkeypatch.setenv("OMNIFUSE_PROGRESS", "live")
    assert not module.plain_wanted(Console(file=io.StringIO()))
    monkeypatch.setenv("OMNIFUSE_PROGRESS", "plain")
    assert module.plain_wanted(Console(file=io.StringIO(), force_terminal=True))
