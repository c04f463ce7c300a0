"""The make-data generator: layout contract, missingness, determinism, validation, knobs."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omnifuse_cli.data.manifest import read_manifest
from omnifuse_cli.engine.config import DEFAULT_MODALITIES
from omnifuse_cli.engine.synthesis import CohortSpec, CohortSummary, make_cohort
from omnifuse_cli.errors import ConfigError

SMALL = {"image_size": 64}
# Findings that only the severe sentence pool uses (C=3 maps class 2 to it).
SEVERE_WORDS = re.compile("团块|恶性|癌栓|淋巴结|积液|消瘦")


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def labs_of(row: dict[str, str]) -> list[float | None]:
    return json.loads(row["labs"])


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[CohortSummary, Path]:
    out = tmp_path_factory.mktemp("cohort") / "data"  # does not exist yet: make_cohort creates it
    return make_cohort(CohortSpec(n=18, seed=3, **SMALL), out), out


def test_layout_matches_the_contract(small: tuple[CohortSummary, Path]) -> None:
    summary, out = small
    assert summary.manifest == out / "manifest.csv"
    assert summary.labs_table == out / "labs_table.csv"
    header = summary.manifest.read_text(encoding="utf-8").splitlines()[0]
    assert header == "id,label,labs,us,text"
    rows = read_rows(summary.manifest)
    assert [r["id"] for r in rows] == [f"{i:010d}" for i in range(1, 19)]
    assert all(re.fullmatch(r"\d{10}", r["id"]) for r in rows)
    labels = [int(r["label"]) for r in rows]
    assert sorted(set(labels)) == [0, 1, 2]
    assert summary.label_counts == {0: 6, 1: 6, 2: 6}

    n_images = 0
    for r in rows:
        present = [bool(r[m]) for m in ("labs", "us", "text")]
        assert any(present), f"patient {r['id']} has no modality"
        if r["labs"]:
            values = labs_of(r)
            assert len(values) == 20
            assert all(v is None or isinstance(v, (int, float)) for v in values)
        if r["us"]:
            paths = r["us"].split(";")
            assert 1 <= len(paths) <= 3
            for k, rel in enumerate(paths, start=1):
                assert rel == f"us/{r['id']}_{k}.png"
                with Image.open(out / rel) as img:
                    assert img.mode == "L" and img.size == (64, 64)
            n_images += len(paths)
        if r["text"]:
            assert r["text"] == f"text/{r['id']}.txt"
            note = (out / r["text"]).read_text(encoding="utf-8")
            assert len(re.findall(r"[\u4e00-\u9fff]", note)) >= 20
    assert summary.n_images == n_images == len(list((out / "us").glob("*.png")))
    assert summary.n_patients == 18
    assert summary.present_counts == {m: sum(bool(r[m]) for r in rows)
                                      for m in ("labs", "us", "text")}


def test_labs_table_agrees_with_the_manifest(small: tuple[CohortSummary, Path]) -> None:
    summary, _ = small
    table = read_rows(summary.labs_table)
    with summary.labs_table.open(encoding="utf-8") as handle:
        columns = handle.readline().strip().split(",")
    assert columns[0] == "id" and len(columns) == 21
    assert {"WBC", "PLT", "ALT", "ALB", "CRP"} <= set(columns)
    manifest = {r["id"]: r for r in read_rows(summary.manifest)}
    assert [r["id"] for r in table] == [i for i, r in manifest.items() if r["labs"]]
    for row in table:
        inline = labs_of(manifest[row["id"]])
        cells = [row[c] for c in columns[1:]]
        assert [None if c == "" else float(c) for c in cells] == inline


def test_the_project_reader_accepts_the_cohort(small: tuple[CohortSummary, Path]) -> None:
    summary, _ = small
    cohort = read_manifest(summary.manifest, DEFAULT_MODALITIES, num_classes=3)
    rows = read_rows(summary.manifest)
    assert len(cohort) == 18
    assert cohort.labels.tolist() == [int(r["label"]) for r in rows]
    for j, name in enumerate(cohort.names):
        assert cohort.present[:, j].tolist() == [bool(r[name]) for r in rows]


def test_missing_rates_are_respected_and_nobody_is_empty(tmp_path: Path) -> None:
    spec = CohortSpec(n=200, seed=5, image_size=32, images_per_patient=1,
                      missing_labs=0.2, missing_us=0.3, missing_text=0.5)
    summary = make_cohort(spec, tmp_path)
    rows = read_rows(summary.manifest)
    for name, rate in (("labs", 0.2), ("us", 0.3), ("text", 0.5)):
        missing = sum(not r[name] for r in rows) / len(rows)
        # The rescue of patients who lost everything lowers the rate a little.
        assert rate - 0.09 < missing < rate + 0.07, (name, missing)
    assert all(r["labs"] or r["us"] or r["text"] for r in rows)
    values = [v for r in rows if r["labs"] for v in labs_of(r)]
    assert 0.01 < sum(v is None for v in values) / len(values) < 0.06  # single analytes


def test_heavy_missingness_still_leaves_one_modality(tmp_path: Path) -> None:
    spec = CohortSpec(n=60, seed=1, image_size=32, missing_labs=0.9, missing_us=0.9,
                      missing_text=0.9)
    rows = read_rows(make_cohort(spec, tmp_path).manifest)
    assert all(r["labs"] or r["us"] or r["text"] for r in rows)
    assert sum(not (r["labs"] or r["us"] or r["text"]) for r in rows) == 0


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path) -> None:
    spec = CohortSpec(n=12, seed=11, **SMALL)
    first = tree_bytes(make_cohort(spec, tmp_path / "a").out_dir)
    second = tree_bytes(make_cohort(spec, tmp_path / "b").out_dir)
    assert any(name.endswith(".png") for name in first)
    assert first == second
    other = tree_bytes(make_cohort(CohortSpec(n=12, seed=12, **SMALL), tmp_path / "c").out_dir)
    assert other["manifest.csv"] != first["manifest.csv"]
    shared_png = sorted(set(first) & set(other) & {n for n in first if n.endswith(".png")})
    assert shared_png and any(first[n] != other[n] for n in shared_png)


def test_one_modality_knob_leaves_the_others_alone(tmp_path: Path) -> None:
    base = CohortSpec(n=12, seed=4, **SMALL)
    noisy = CohortSpec(n=12, seed=4, text_noise=3.0, text_signal=0.1, **SMALL)
    a = tree_bytes(make_cohort(base, tmp_path / "a").out_dir)
    b = tree_bytes(make_cohort(noisy, tmp_path / "b").out_dir)
    assert a["labs_table.csv"] == b["labs_table.csv"]
    assert {n: v for n, v in a.items() if n.endswith(".png")} == {
        n: v for n, v in b.items() if n.endswith(".png")}
    assert {n: v for n, v in a.items() if n.startswith("text")} != {
        n: v for n, v in b.items() if n.startswith("text")}


def test_progress_reports_every_patient(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    make_cohort(CohortSpec(n=8, image_size=32), tmp_path,
                progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 8) for i in range(9)]


@pytest.mark.parametrize("num_classes, labs_dim", [(2, 1), (5, 30)])
def test_other_class_counts_and_panel_sizes(tmp_path: Path, num_classes: int,
                                            labs_dim: int) -> None:
    spec = CohortSpec(n=4 * num_classes, num_classes=num_classes, labs_dim=labs_dim,
                      image_size=32, missing_labs=0.0)
    summary = make_cohort(spec, tmp_path)
    assert summary.label_counts == {c: 4 for c in range(num_classes)}
    rows = read_rows(summary.manifest)
    assert all(len(labs_of(r)) == labs_dim for r in rows)
    assert all(any(v is not None for v in labs_of(r)) for r in rows)
    columns = summary.labs_table.read_text(encoding="utf-8").splitlines()[0].split(",")
    assert len(columns) == labs_dim + 1
    if labs_dim > 26:
        assert columns[-1] == f"X{labs_dim}"


@pytest.mark.parametrize("kwargs, message", [
    ({"missing_us": 1.5}, r"--missing-us must be in \[0, 1\), got 1\.5"),
    ({"missing_labs": 1.0}, r"--missing-labs must be in \[0, 1\)"),
    ({"missing_text": -0.1}, r"--missing-text"),
    ({"us_signal": 1.2}, r"--us-signal must be in \[0, 1\]"),
    ({"text_signal": float("nan")}, r"--text-signal"),
    ({"labs_signal": -1.0}, r"--labs-signal must be >= 0"),
    ({"labs_noise": -0.5}, r"--labs-noise"),
    ({"us_noise": float("inf")}, r"--us-noise"),
    ({"text_noise": -2}, r"--text-noise"),
    ({"num_classes": 1}, r"--num-classes must be at least 2"),
    ({"n": 5}, r"--n must be at least 6"),
    ({"n": 2.5}, r"--n must be an integer"),
    ({"labs_dim": 0}, r"--labs-dim"),
    ({"image_size": 8}, r"--image-size"),
    ({"images_per_patient": 0}, r"--images-per-patient"),
])
def test_invalid_specs_name_the_option(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        CohortSpec(**kwargs)
    assert info.value.hint


def signal_gap(values: np.ndarray, labels: np.ndarray) -> float:
    """Distance between the class-0 and class-2 means, in pooled SDs."""
    a, b = values[labels == 0], values[labels == 2]
    return abs(a.mean() - b.mean()) / np.sqrt((a.var() + b.var()) / 2)


def test_labs_signal_moves_the_signal_analytes(tmp_path: Path) -> None:
    gaps = []
    for k, strength in enumerate((0.0, 3.0)):
        spec = CohortSpec(n=90, seed=2, image_size=32, missing_labs=0.0, labs_signal=strength)
        summary = make_cohort(spec, tmp_path / str(k))
        rows = read_rows(summary.labs_table)
        labels = {r["id"]: int(r["label"]) for r in read_rows(summary.manifest)}
        pairs = [(np.log(float(r["ALT"])), labels[r["id"]]) for r in rows if r["ALT"]]
        values, classes = (np.array(x) for x in zip(*pairs, strict=True))
        gaps.append(signal_gap(values, classes))
    assert gaps[0] < 0.6 < 2.0 < gaps[1], gaps


def test_us_signal_darkens_severe_livers(tmp_path: Path) -> None:
    gaps = []
    for k, strength in enumerate((0.0, 1.0)):
        spec = CohortSpec(n=90, seed=6, image_size=48, images_per_patient=1, missing_us=0.0,
                          us_signal=strength)
        rows = read_rows(make_cohort(spec, tmp_path / str(k)).manifest)
        images = np.stack([np.asarray(Image.open(tmp_path / str(k) / r["us"]), np.float64)
                           for r in rows])
        fan = images.mean(axis=0) > 10
        dark = np.array([(img[fan] < 60).mean() for img in images])
        gaps.append(signal_gap(dark, np.array([int(r["label"]) for r in rows])))
    assert gaps[0] < 0.7 < 1.3 < gaps[1], gaps


def test_text_signal_decides_which_findings_appear(tmp_path: Path) -> None:
    shares = []
    for k, strength in enumerate((0.0, 1.0)):
        spec = CohortSpec(n=60, seed=8, image_size=32, missing_text=0.0, text_noise=0.0,
                          text_signal=strength)
        out = tmp_path / str(k)
        rows = read_rows(make_cohort(spec, out).manifest)
        normal = [(out / r["text"]).read_text(encoding="utf-8") for r in rows
                  if r["label"] == "0"]
        shares.append(np.mean([bool(SEVERE_WORDS.search(note)) for note in normal]))
    assert shares[1] == 0.0
    assert shares[0] > 0.2, shares
