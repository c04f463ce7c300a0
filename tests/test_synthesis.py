"""The make-data generator: layout contract, missingness, determinism, validation, knobs."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from omnifuse_cli import synthetic as synthesis
from omnifuse_cli.cli.app import app
from omnifuse_cli.config import DEFAULT_MODALITIES
from omnifuse_cli.data.manifest import read_manifest
from omnifuse_cli.errors import ConfigError
from omnifuse_cli.synthetic import (
    CohortSpec,
    CohortSummary,
    DrawnCohort,
    draw_cohort,
    make_cohort,
)
from omnifuse_cli.synthetic.notes import _FINDINGS

SMALL = {"image_size": 64}
# The signal-knob tests measure one knob's class signal alone: no within-class severity spread
# shared across modalities, no corrupted patients.
ISOLATED = {"shared_severity": 0.0, "corrupt_rate": 0.0}
# Findings that only the severe sentence pool uses (C=3 maps class 2 to it).
SEVERE_WORDS = re.compile("团块|恶性|癌栓|淋巴结|积液|消瘦")


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def labs_of(row: dict[str, str]) -> list[float | None]:
    return json.loads(row["labs"])


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


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
    assert summary.present_counts == {
        m: sum(bool(r[m]) for r in rows) for m in ("labs", "us", "text")
    }


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
    spec = CohortSpec(
        n=200,
        seed=5,
        image_size=32,
        images_per_patient=1,
        missing_labs=0.2,
        missing_us=0.3,
        missing_text=0.5,
    )
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
    spec = CohortSpec(
        n=60, seed=1, image_size=32, missing_labs=0.9, missing_us=0.9, missing_text=0.9
    )
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
        n: v for n, v in b.items() if n.endswith(".png")
    }
    assert {n: v for n, v in a.items() if n.startswith("text")} != {
        n: v for n, v in b.items() if n.startswith("text")
    }


def test_progress_reports_every_patient(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    make_cohort(
        CohortSpec(n=8, image_size=32),
        tmp_path,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(i, 8) for i in range(9)]


@pytest.mark.parametrize("num_classes, labs_dim", [(2, 1), (5, 30)])
def test_other_class_counts_and_panel_sizes(
    tmp_path: Path, num_classes: int, labs_dim: int
) -> None:
    spec = CohortSpec(
        n=4 * num_classes,
        num_classes=num_classes,
        labs_dim=labs_dim,
        image_size=32,
        missing_labs=0.0,
    )
    summary = make_cohort(spec, tmp_path)
    assert summary.label_counts == {c: 4 for c in range(num_classes)}
    rows = read_rows(summary.manifest)
    assert all(len(labs_of(r)) == labs_dim for r in rows)
    assert all(any(v is not None for v in labs_of(r)) for r in rows)
    columns = summary.labs_table.read_text(encoding="utf-8").splitlines()[0].split(",")
    assert len(columns) == labs_dim + 1
    if labs_dim > 26:
        assert columns[-1] == f"X{labs_dim}"


@pytest.mark.parametrize(
    "kwargs, message",
    [
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
        ({"shared_severity": 1.5}, r"--shared-severity must be in \[0, 1\], got 1\.5"),
        ({"shared_severity": -0.1}, r"--shared-severity"),
        ({"shared_severity": float("nan")}, r"--shared-severity"),
        ({"corrupt_rate": 1.0}, r"--corrupt-rate must be in \[0, 1\), got 1\.0"),
        ({"corrupt_rate": -0.01}, r"--corrupt-rate"),
        ({"missing_mode": "random"}, r"--missing-mode must be mcar or mnar, got 'random'"),
        ({"missing_mode": 1}, r"--missing-mode must be mcar or mnar"),
    ],
)
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
        spec = CohortSpec(
            n=90, seed=2, image_size=32, missing_labs=0.0, labs_signal=strength, **ISOLATED
        )
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
        spec = CohortSpec(
            n=90,
            seed=6,
            image_size=48,
            images_per_patient=1,
            missing_us=0.0,
            us_signal=strength,
            **ISOLATED,
        )
        rows = read_rows(make_cohort(spec, tmp_path / str(k)).manifest)
        images = np.stack(
            [np.asarray(Image.open(tmp_path / str(k) / r["us"]), np.float64) for r in rows]
        )
        fan = images.mean(axis=0) > 10
        dark = np.array([(img[fan] < 60).mean() for img in images])
        gaps.append(signal_gap(dark, np.array([int(r["label"]) for r in rows])))
    assert gaps[0] < 0.7 < 1.3 < gaps[1], gaps


def test_text_signal_decides_which_findings_appear(tmp_path: Path) -> None:
    shares = []
    for k, strength in enumerate((0.0, 1.0)):
        spec = CohortSpec(
            n=60,
            seed=8,
            image_size=32,
            missing_text=0.0,
            text_noise=0.0,
            text_signal=strength,
            **ISOLATED,
        )
        out = tmp_path / str(k)
        rows = read_rows(make_cohort(spec, out).manifest)
        normal = [(out / r["text"]).read_text(encoding="utf-8") for r in rows if r["label"] == "0"]
        shares.append(np.mean([bool(SEVERE_WORDS.search(note)) for note in normal]))
    assert shares[1] == 0.0
    assert shares[0] > 0.2, shares


# ---------------------------------------------------------------------------------------------
# Patient severity, corruption, missing-not-at-random

# make_cohort(CohortSpec(n=24, seed=5, image_size=64)) as written before shared_severity,
# corrupt_rate and missing_mode existed: sha256 of the CSVs, and of "<name> <sha256>\n" lines
# over the notes' bytes and over the PNGs' decoded pixels (PNG encoders may change their bytes).
REFERENCE = {
    "manifest.csv": "665c438f803b0a92e598a13444b6ecfbc0ee45f00fccca383af37963a35e6844",
    "labs_table.csv": "f2f5de515d2b42eee94252a60b680c3d04ebc07a8acbaf8112bba946d8cbb6af",
    "text": "7159ba5fc5d93f440f2f3c1dcca9a468cf12ca6442bc0c227f2d516c2e1a4808",
    "us": "13f0278229a4c76e9c6e5888cc261448a1227387a82a35e3e23ba1133e3c9c4c",
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def folder_digest(root: Path, folder: str) -> str:
    lines = []
    for path in sorted((root / folder).iterdir()):
        data = (
            np.asarray(Image.open(path)).tobytes() if path.suffix == ".png" else path.read_bytes()
        )
        lines.append(f"{folder}/{path.name} {sha256(data)}\n")
    return sha256("".join(lines).encode())


def test_old_settings_reproduce_earlier_cohorts(tmp_path: Path) -> None:
    spec = CohortSpec(
        n=24, seed=5, image_size=64, shared_severity=0.0, corrupt_rate=0.0, missing_mode="mcar"
    )
    make_cohort(spec, tmp_path)
    found = {
        name: sha256((tmp_path / name).read_bytes()) for name in ("manifest.csv", "labs_table.csv")
    }
    found.update({folder: folder_digest(tmp_path, folder) for folder in ("text", "us")})
    assert found == REFERENCE


def within_class_correlation(x: np.ndarray, y: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation after removing each class's mean from both: what the class leaves."""
    x, y = x.astype(float), y.astype(float)
    for c in np.unique(labels):
        x[labels == c] -= x[labels == c].mean()
        y[labels == c] -= y[labels == c].mean()
    return float(np.corrcoef(x, y)[0, 1])


FINDING_PATTERNS = [
    [
        re.compile(re.escape(t).replace(r"\{size\}", r"[\d.]+").replace(r"\{kg\}", r"\d+"))
        for t in pool
    ]
    for pool in _FINDINGS
]


def findings_level(note: str) -> float:
    """Mean severity level (0-4) of the note's findings sentences; NaN without findings."""
    levels = [k for k, pool in enumerate(FINDING_PATTERNS) for p in pool if p.search(note)]
    return float(np.mean(levels)) if levels else float("nan")


@pytest.mark.parametrize("shared, low, high", [(0.0, -0.1, 0.1), (1.0, 0.15, 1.0)])
def test_shared_severity_correlates_labs_and_notes_within_a_class(
    shared: float, low: float, high: float
) -> None:
    spec = CohortSpec(
        n=900,
        seed=1,
        shared_severity=shared,
        corrupt_rate=0.0,
        labs_noise=0.5,
        text_signal=0.8,
        text_noise=0.0,
    )
    cohort = draw_cohort(spec)  # no images: the correlation needs many patients
    level = np.array([findings_level(note) for note in cohort.notes])
    names = cohort.lab_names
    # The liver axis: ALT follows the early "abnormal" driver, TBIL the "advanced" one.
    liver = np.log(cohort.labs[:, names.index("ALT")]) + np.log(cohort.labs[:, names.index("TBIL")])
    ok = ~np.isnan(level) & ~np.isnan(liver)
    assert ok.sum() > 800
    r = within_class_correlation(liver[ok], level[ok], cohort.labels[ok])
    assert low < r < high, r


def test_shared_severity_moves_ultrasound_with_the_patient() -> None:
    drawn = {
        a: draw_cohort(CohortSpec(n=300, seed=2, shared_severity=a, corrupt_rate=0.0))
        for a in (0.0, 0.5, 1.0)
    }
    classes = synthesis.severities(3)[drawn[0.0].labels]
    np.testing.assert_array_equal(drawn[0.0].us_severity, classes)
    patient = drawn[1.0].severity
    np.testing.assert_array_equal(drawn[1.0].us_severity, patient)
    np.testing.assert_allclose(drawn[0.5].us_severity, (classes + patient) / 2)
    # About 0.35 class gaps around the class (less at the clipped ends), different per patient.
    spread = np.std(patient[drawn[1.0].labels == 1] - 0.5)
    assert 0.12 < spread < 0.23, spread


def test_truth_csv_and_corruption_leave_the_rest_alone(tmp_path: Path) -> None:
    base = CohortSpec(n=40, seed=7, image_size=32, images_per_patient=2, corrupt_rate=0.0)
    clean = make_cohort(base, tmp_path / "clean")
    bad = make_cohort(dataclasses.replace(base, corrupt_rate=0.5), tmp_path / "bad")
    truth = read_rows(bad.truth)
    assert list(truth[0]) == ["id", "label", "severity", "corrupted", "corruption"]
    manifest = read_rows(bad.manifest)
    assert [(r["id"], r["label"]) for r in truth] == [(r["id"], r["label"]) for r in manifest]
    assert all(0 <= float(r["severity"]) <= 1 for r in truth)
    kinds = {r["corruption"] for r in truth if r["corrupted"]}
    assert kinds == {"uninformative", "other_patient"}
    assert all(not r["corruption"] for r in truth if not r["corrupted"])
    assert bad.corrupted_counts == {
        m: sum(r["corrupted"] == m for r in truth) for m in ("labs", "us", "text")
    }
    assert sum(bad.corrupted_counts.values()) >= 10
    assert not any(r["corrupted"] for r in read_rows(clean.truth))
    assert [r["severity"] for r in read_rows(clean.truth)] == [r["severity"] for r in truth]

    clean_rows = read_rows(clean.manifest)
    clean_labs = {r["id"]: r for r in read_rows(clean.labs_table)}
    bad_labs = {r["id"]: r for r in read_rows(bad.labs_table)}

    def views(root: Path, row: dict[str, str]) -> list[bytes]:
        return [(root / p).read_bytes() for p in row["us"].split(";") if p]

    for row, before, after in zip(truth, clean_rows, manifest, strict=True):
        pid, modality = row["id"], row["corrupted"]
        assert [bool(before[m]) for m in ("labs", "us", "text")] == [
            bool(after[m]) for m in ("labs", "us", "text")
        ]
        assert not modality or after[modality], "a missing modality was corrupted"
        if after["labs"]:
            assert (bad_labs[pid] == clean_labs[pid]) == (modality != "labs"), pid
        if after["us"]:
            same = views(tmp_path / "clean", before) == views(tmp_path / "bad", after)
            assert same == (modality != "us"), pid
        if after["text"]:
            same = (tmp_path / "clean" / before["text"]).read_bytes() == (
                tmp_path / "bad" / after["text"]
            ).read_bytes()
            assert same == (modality != "text"), pid


def modality_counts(cohort: DrawnCohort) -> np.ndarray:
    return cohort.present.sum(axis=1)


def test_corrupt_rate_is_the_share_of_patients_with_two_modalities() -> None:
    spec = CohortSpec(
        n=3000, seed=3, corrupt_rate=0.2, missing_labs=0.5, missing_us=0.5, missing_text=0.5
    )
    cohort = draw_cohort(spec)
    corrupted = np.array([bool(m) for m in cohort.corrupted])
    eligible = modality_counts(cohort) >= 2
    assert not corrupted[~eligible].any()
    assert (~eligible).sum() > 500  # the rule was really exercised
    assert 0.17 < corrupted[eligible].mean() < 0.23, corrupted[eligible].mean()
    kinds = [k for k in cohort.corruption if k]
    assert 0.4 < kinds.count("uninformative") / len(kinds) < 0.6
    for j, modality in enumerate(("labs", "us", "text")):
        rows = [i for i, m in enumerate(cohort.corrupted) if m == modality]
        assert cohort.present[rows, j].all()
        assert 0.25 < len(rows) / len(kinds) < 0.42


def test_other_patient_corruption_copies_someone_elses_data() -> None:
    spec = CohortSpec(
        n=200, seed=4, corrupt_rate=0.6, missing_labs=0.0, missing_us=0.0, missing_text=0.0
    )
    clean = draw_cohort(dataclasses.replace(spec, corrupt_rate=0.0))
    bad = draw_cohort(spec)
    for i, (modality, kind) in enumerate(zip(bad.corrupted, bad.corruption, strict=True)):
        if kind != "other_patient":
            continue
        others = [j for j in range(spec.n) if j != i]
        if modality == "labs":
            assert any(np.array_equal(bad.labs[i], clean.labs[j], equal_nan=True) for j in others)
        elif modality == "text":
            assert bad.notes[i] in [clean.notes[j] for j in others]
        else:
            j = bad.us_seeds[i].spawn_key[-1]
            assert j != i and bad.us_seeds[i].spawn_key == clean.us_seeds[j].spawn_key
            assert bad.us_severity[i] == clean.us_severity[j]


def test_mnar_makes_milder_patients_skip_ultrasound() -> None:
    rates = {"missing_labs": 0.2, "missing_us": 0.3, "missing_text": 0.3}
    result = {}
    for mode in ("mcar", "mnar"):
        cohort = draw_cohort(CohortSpec(n=4000, seed=6, missing_mode=mode, **rates))
        mild, severe = cohort.severity < 1 / 3, cohort.severity > 2 / 3
        lacks = ~cohort.present
        for j, name in enumerate(("labs", "us", "text")):
            # The rescue of patients who lost everything lowers the overall rate a little.
            assert abs(lacks[:, j].mean() - rates[f"missing_{name}"]) < 0.025, (mode, name)
        result[mode] = [lacks[mild, j].mean() / lacks[severe, j].mean() for j in range(3)]
    assert all(0.7 < ratio < 1.3 for ratio in result["mcar"]), result
    labs, us, text = result["mnar"]
    assert labs > 2 and us > 2, result
    # Notes stay MCAR; the rescue of patients left with nothing, more often mild ones under
    # mnar, gives a few mild patients their note back.
    assert 0.7 < text < 1.3, result


def test_mnar_caps_the_probability() -> None:
    # Uncapped, weight 1.5 times 0.9 would remove every mildest patient's ultrasound; with
    # notes always present no rescue blurs the count.
    spec = CohortSpec(n=3000, seed=8, missing_mode="mnar", missing_us=0.9, missing_text=0.0)
    cohort = draw_cohort(spec)
    mildest = cohort.severity == 0
    assert mildest.sum() > 300
    assert 0.9 < (~cohort.present[mildest, 1]).mean() < 0.99


def test_cli_options_reach_the_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    specs: list[CohortSpec] = []
    real = synthesis.make_cohort

    def spy(spec: CohortSpec, out_dir: Path, **kwargs: object) -> CohortSummary:
        specs.append(spec)
        return real(spec, out_dir, **kwargs)

    monkeypatch.setattr(synthesis, "make_cohort", spy)
    runner = CliRunner()
    common = ["make-data", "--n", "12", "--image-size", "32"]
    result = runner.invoke(
        app,
        [
            *common,
            "--out-dir",
            str(tmp_path / "a"),
            "--shared-severity",
            "0.25",
            "--corrupt-rate",
            "0.5",
            "--missing-mode",
            "mnar",
        ],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert (specs[0].shared_severity, specs[0].corrupt_rate, specs[0].missing_mode) == (
        0.25,
        0.5,
        "mnar",
    )
    assert "listed in truth.csv" in result.output
    assert (tmp_path / "a" / "truth.csv").is_file()
    result = runner.invoke(app, [*common, "--out-dir", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    defaults = CohortSpec()
    assert (specs[1].shared_severity, specs[1].corrupt_rate, specs[1].missing_mode) == (
        defaults.shared_severity,
        defaults.corrupt_rate,
        defaults.missing_mode,
    )
    result = runner.invoke(
        app, [*common, "--out-dir", str(tmp_path / "c"), "--missing-mode", "sometimes"]
    )
    assert result.exit_code == 2
    assert "--missing-mode must be mcar or mnar" in result.stderr


def test_no_images_inline_notes_keep_labs_and_notes(tmp_path: Path) -> None:
    """The fast large-cohort layout: no us column or PNGs, notes in the manifest; the labs and
    notes are the ones the full layout writes for the same seed."""
    runner = CliRunner()
    args = ["make-data", "--n", "30", "--seed", "4", "--image-size", "32"]
    result = runner.invoke(
        app,
        [*args, "--out-dir", str(tmp_path / "fast"), "--no-images", "--inline-notes"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "--modality labs=vector --modality text=text" in result.output
    full = make_cohort(CohortSpec(n=30, seed=4, image_size=32), tmp_path / "full")
    fast = tmp_path / "fast"
    assert not (fast / "us").exists() and not (fast / "text").exists()
    assert (fast / "manifest.csv").read_text(encoding="utf-8").splitlines()[0] == (
        "id,label,labs,text"
    )
    full_rows = {r["id"]: r for r in read_rows(full.manifest)}
    fast_rows = read_rows(fast / "manifest.csv")
    assert all(r["labs"] or r["text"] for r in fast_rows)
    compared = 0
    for row in fast_rows:
        other = full_rows[row["id"]]
        assert row["label"] == other["label"]
        if row["labs"] and other["labs"]:
            assert row["labs"] == other["labs"]
        if row["text"] and other["text"]:
            assert row["text"] == (full.out_dir / other["text"]).read_text(encoding="utf-8")
            compared += 1
    assert compared > 5
    modalities = (DEFAULT_MODALITIES[0], DEFAULT_MODALITIES[2])
    cohort = read_manifest(fast / "manifest.csv", modalities, num_classes=3)
    assert cohort.texts["text"][0] is None or "患者" in cohort.texts["text"][0]
