"""`omnifuse tune`: the search space, the held-out test patients, pruning, the shared study
(exactly N trials between processes, Ctrl-C then rerun completes it), the outputs and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import yaml

import omnifuse_cli as omnifuse
from omnifuse_cli.errors import ConfigError
from omnifuse_cli.tuning import study as studies
from omnifuse_cli.tuning.request import TuneRequest
from omnifuse_cli.tuning.run import _pruning_reporter, _use_sampler
from omnifuse_cli.tuning.space import DEFAULT_SPACE_YAML, default_space, parse_space

from .helpers import assert_ok, assert_user_error, flat, invoke

FAST = {
    "image_backbone": "resnet18",
    "image_size": 32,
    "device": "cpu",
    "pretrained_image": False,
    "batch_size": 8,
    "epochs": 2,
    "seed": 0,
    "tla_min_patients": 1,
}
SPACE = {
    "lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
    "modality_drop": {"type": "float", "low": 0.0, "high": 0.5},
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 60-patient make-data cohort (32 px images, 3 classes)."""
    folder = tmp_path_factory.mktemp("tune_cohort")
    return omnifuse.make_data(folder / "c", n=60, image_size=32, seed=3).manifest


def _flags() -> list[str]:
    from omnifuse_cli.settings import as_flags

    return as_flags(FAST)


def _space_file(folder: Path) -> Path:
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(SPACE), encoding="utf-8")
    return path


# -- the search space ------------------------------------------------------------------------


def test_default_space_parses_and_tune_init_writes_it(tmp_path: Path) -> None:
    space = default_space()
    assert {"lr", "lambda0", "modality_drop", "image_backbone", "image_size"} <= set(space.names)
    assert_ok(invoke("tune", "init", tmp_path / "space.yaml"))
    assert (tmp_path / "space.yaml").read_text(encoding="utf-8") == DEFAULT_SPACE_YAML
    assert_user_error(
        invoke("tune", "init", tmp_path / "space.yaml"), "already exists", "--overwrite"
    )


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"lrr": {"type": "float", "low": 0.1, "high": 1}}, "did you mean lr"),
        ({"test_ratio": {"type": "float", "low": 0.1, "high": 0.3}}, "cannot be searched"),
        ({"lr": {"type": "float", "low": 0.1, "high": 0.01}}, "must be below high"),
        (
            {"lr": {"type": "float", "low": 0.0, "high": 0.01, "log": True}},
            "log range needs low > 0",
        ),
        ({"num_ra": {"type": "float", "low": 1, "high": 3}}, "whole numbers"),
        ({"image_backbone": {"type": "int", "low": 1, "high": 3}}, "range for a str setting"),
        ({"image_backbone": {"choices": ["resnet18", "resnet999"]}}, "resnet999"),
        ({"modality_drop": {"type": "float", "low": 0.0, "high": 1.5}}, "modality_drop = 1.5"),
        ({"lr": {"type": "float", "low": 1e-4}}, "needs low and high"),
        ({"lr": {"type": "float", "low": 1e-4, "high": 1e-3, "scale": "log"}}, "unknown key"),
        ({"epochs": -3}, "epochs = -3"),
    ],
)
def test_space_errors_name_the_setting(raw: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_space(raw, "space.yaml")
    assert fragment in f"{err.value.message} {err.value.hint or ''}"


def test_space_fixed_values_and_dashes() -> None:
    space = parse_space({"image-size": {"choices": [32, 64]}, "epochs": 3}, "s")
    assert space.names == ["image_size"] and dict(space.fixed) == {"epochs": 3}


# -- a search end to end ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tuned(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("tune") / "t"
    return omnifuse.tune(
        cohort,
        num_classes=3,
        trials=3,
        space=SPACE,
        out_dir=out,
        refit=True,
        test_ratio=0.2,
        train_ratio=0.6,
        val_ratio=0.2,
        **FAST,
    )


def test_the_search_never_sees_the_test_patients(tuned: Any, cohort: Path) -> None:
    out = tuned.out_dir
    split = pd.read_csv(out / "split.csv", dtype=str)
    test_ids = set(split.loc[split["split"] == "test", "id"])
    assert len(test_ids) == 12  # 20% of 60
    for trial in sorted((out / "trials").iterdir()):
        seen = pd.read_csv(trial / "split_assignment.csv", dtype={"id": str})
        assert not set(seen["id"]) & test_ids, trial
        assert set(seen["split"]) <= {"train", "val"}
    # The refit is `omnifuse train` with the same seed and ratios: its test split is exactly the
    # patients the search set aside, and they are scored there once.
    refit = pd.read_csv(out / "refit" / "split_assignment.csv", dtype={"id": str})
    assert set(refit.loc[refit["split"] == "test", "id"]) == test_ids
    assert tuned.refit_test and 0.0 <= tuned.refit_test["auroc"] <= 1.0


def test_outputs_describe_every_trial(tuned: Any) -> None:
    out = tuned.out_dir
    trials = pd.read_csv(out / "trials.csv")
    assert list(trials["number"]) == [0, 1, 2]
    assert set(trials["state"]) == {"COMPLETE"}
    assert {"param_lr", "param_modality_drop"} <= set(trials.columns)
    best = json.loads((out / "best.json").read_text())
    row = trials.loc[trials["value"].idxmax()]
    assert best["number"] == row["number"] == tuned.best_number
    assert best["value"] == pytest.approx(row["value"])
    assert best["settings"]["lr"] == pytest.approx(row["param_lr"])
    assert best["settings"]["select_by"] == "auroc"  # epochs picked by the tuned metric
    # The objective is the best epoch's validation AUROC of the trial's own run.
    metrics = pd.read_csv(out / "trials" / f"{int(row['number']):04d}" / "metrics.csv")
    picked = metrics.loc[metrics["best"] == 1, "val_auroc"].iloc[-1]  # the last new best
    assert picked == pytest.approx(row["value"])
    steps = pd.read_csv(out / "intermediate.csv")
    assert set(steps["number"]) == {0, 1, 2} and set(steps["step"]) == {1, 2}
    # best.yaml is a --config file of train: every key is one of train's, values as chosen.
    config = yaml.safe_load((out / "best.yaml").read_text())
    assert config["lr"] == pytest.approx(best["settings"]["lr"])
    assert config["image-backbone"] == "resnet18" and config["num-classes"] == 3
    meta = pd.read_csv(out / "refit" / "meta.csv", dtype=str).set_index("key")["value"]
    assert meta["tune_study"] == tuned.study_name and meta["tune_trials"] == "3"
    assert not any((out / "trials").rglob("checkpoint.pt"))  # trials keep no weights


def test_rerun_is_a_no_op_and_more_trials_extend_the_study(tuned: Any, cohort: Path) -> None:
    common = dict(
        num_classes=3,
        space=SPACE,
        out_dir=tuned.out_dir,
        test_ratio=0.2,
        train_ratio=0.6,
        val_ratio=0.2,
        **FAST,
    )
    again = omnifuse.tune(cohort, trials=3, **common)
    assert again.ran == 0 and again.counts["complete"] == 3
    more = omnifuse.tune(cohort, trials=4, **common)
    assert more.ran == 1 and more.counts["complete"] == 4
    with pytest.raises(ConfigError, match="another metric"):
        omnifuse.tune(cohort, trials=4, metric="log_loss", **common)


def test_settings_given_leave_the_search(cohort: Path, tmp_path: Path) -> None:
    result = omnifuse.tune(
        cohort, num_classes=3, trials=1, space=SPACE, out_dir=tmp_path / "t", lr=0.002, **FAST
    )
    trials = result.trials
    assert "param_lr" not in trials.columns and "param_modality_drop" in trials.columns
    assert result.best_settings["lr"] == 0.002


# -- pruning ---------------------------------------------------------------------------------


def test_median_pruning_stops_a_trailing_trial(tmp_path: Path) -> None:
    from omnifuse_cli.engine.events import ProgressEvent
    from omnifuse_cli.engine.fitting import EpochRecord

    storage = studies.open_storage(f"sqlite:///{tmp_path / 'p.db'}")
    shared, _ = studies.open_study(storage, "p", direction="maximize", trials=6, signature={})
    request = TuneRequest(
        Path("m.csv"),
        3,
        tmp_path,
        space=parse_space(SPACE, "s"),
        study_name="p",
        storage=f"sqlite:///{tmp_path / 'p.db'}",
    )

    def record(epoch: int, auroc: float) -> EpochRecord:
        return EpochRecord(epoch, "frozen", 1.0, {}, 1.0, 0.5, 0.5, auroc, "", {}, 0.1)

    def start() -> optuna.Trial:
        trial_id = studies.claim(shared, storage)
        assert trial_id is not None
        _use_sampler(request, shared, studies.storage_of(shared).get_trial_number_from_id(trial_id))
        return optuna.Trial(shared, trial_id)

    for _ in range(5):  # five finished trials at 0.9 every epoch
        trial = start()
        report = _pruning_reporter(request, trial, "val_auroc", lambda e: None)
        for epoch in range(1, 11):
            report(ProgressEvent("epoch", epoch, 10, record=record(epoch, 0.9)))
        shared.tell(trial, 0.9)
    report = _pruning_reporter(request, start(), "val_auroc", lambda e: None)
    for epoch in range(1, 6):  # warm-up epochs are never pruned
        report(ProgressEvent("epoch", epoch, 10, record=record(epoch, 0.2)))
    with pytest.raises(optuna.TrialPruned, match="epoch 6"):
        report(ProgressEvent("epoch", 6, 10, record=record(6, 0.2)))


def test_a_pruned_cv_trial_is_recorded_as_pruned(
    cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under --folds, the first fold's epochs feed the pruner; TrialPruned passes through cv."""
    from omnifuse_cli.tuning import run as tune_run

    calls = {"n": 0}

    def always(self: optuna.Trial) -> bool:
        calls["n"] += 1
        return True

    monkeypatch.setattr(optuna.Trial, "should_prune", always)
    result = omnifuse.tune(
        cohort, num_classes=3, trials=1, folds=2, space=SPACE, out_dir=tmp_path / "t", **FAST
    )
    assert calls["n"] == 1 and result.counts["pruned"] == 1
    assert "pruned at epoch 1" in result.trials["error"].iloc[0]
    assert tune_run.PRUNE_WARMUP_EPOCHS >= 1


# -- the shared study ------------------------------------------------------------------------


CLAIMER = """
import json, sys
import optuna
from omnifuse_cli.tuning import study as studies
rdb = studies.open_storage(sys.argv[1])
study = optuna.load_study(study_name=sys.argv[2], storage=rdb)
mine = []
while (trial_id := studies.claim(study, rdb)) is not None:
    mine.append(studies.storage_of(study).get_trial_number_from_id(trial_id))
    study.tell(optuna.Trial(study, trial_id), 0.5)
print(json.dumps(mine))
"""


def test_processes_claim_each_trial_exactly_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    storage = studies.open_storage(url)
    studies.open_study(storage, "s", direction="maximize", trials=40, signature={"a": 1})
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, url, "s"], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    claimed = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    numbers = sorted(n for mine in claimed for n in mine)
    assert numbers == list(range(40))  # none twice, none lost, no 41st
    study = optuna.load_study(study_name="s", storage=storage)
    assert len(study.trials) == 40
    with pytest.raises(ConfigError, match="searches something else"):
        studies.open_study(storage, "s", direction="maximize", trials=40, signature={"a": 2})


def _cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "omnifuse_cli", *map(str, args)]


def test_two_cli_processes_share_one_sqlite_study(cohort: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    space = _space_file(tmp_path)
    env = {**os.environ, "OMNIFUSE_PROGRESS": "plain", "OMP_NUM_THREADS": "1"}
    args = [
        "tune",
        "run",
        cohort,
        "--num-classes",
        3,
        "--trials",
        6,
        "--space",
        space,
        "--storage",
        url,
        "--study-name",
        "shared",
        *_flags(),
    ]
    procs = [
        subprocess.Popen(
            _cli(*args, "--out-dir", tmp_path / f"w{i}"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    study = optuna.load_study(study_name="shared", storage=url)
    assert sorted(t.number for t in study.trials) == list(range(6))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    ran = [
        int(
            pd.read_csv(tmp_path / f"w{i}" / "meta.csv", dtype=str).set_index("key")["value"][
                "trials_this_process"
            ]
        )
        for i in range(2)
    ]
    assert sum(ran) == 6 and min(ran) >= 1, ran  # both worked, nothing twice
    folders = sorted(p.name for i in range(2) for p in (tmp_path / f"w{i}" / "trials").iterdir())
    assert folders == [f"{n:04d}" for n in range(6)]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX-only")
def test_ctrl_c_then_rerun_completes_the_study(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "t"
    space = _space_file(tmp_path)
    env = {**os.environ, "OMNIFUSE_PROGRESS": "plain", "OMP_NUM_THREADS": "1"}
    flags = _flags()
    epochs = flags.index("--epochs")
    flags[epochs + 1] = "12"  # long enough trials for the signal to land inside one
    args = [
        "tune",
        "run",
        cohort,
        "--num-classes",
        3,
        "--trials",
        3,
        "--space",
        space,
        "--out-dir",
        out,
        *flags,
    ]
    proc = subprocess.Popen(
        _cli(*args),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A shell's background job starts with SIGINT ignored, and Python then never turns it
        # into KeyboardInterrupt: give the child the default disposition, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while not (out / "trials" / "0001" / "metrics.csv").is_file():  # trial 1 is training
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, text
    assert "interrupted" in text and "rerun the same command" in flat(text)
    storage = f"sqlite:///{(out / 'study.db').absolute().as_posix()}"
    study = optuna.load_study(study_name="t", storage=storage)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 1 and states.count("FAIL") == 1, states
    rerun = subprocess.run(_cli(*args), env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    study = optuna.load_study(study_name="t", storage=storage)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 3
    interrupted = [t for t in study.trials if t.number in studies.interrupted(study)]
    assert len(interrupted) == 1
    # The interrupted trial ran again with its own parameters.
    assert any(t.params == interrupted[0].params for t in done)
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 3 and set(trials["state"]) == {"COMPLETE"}


# -- the CLI ---------------------------------------------------------------------------------


def test_cli_tune_run_prints_trials_and_best(cohort: Path, tmp_path: Path) -> None:
    space = _space_file(tmp_path)
    result = invoke(
        "tune",
        "run",
        cohort,
        "--num-classes",
        3,
        "--trials",
        2,
        "--space",
        space,
        "--out-dir",
        tmp_path / "t",
        "--folds",
        2,
        *_flags(),
        "--lr",
        "0.001",
        env={"OMNIFUSE_PROGRESS": "plain"},
    )
    assert_ok(result)
    text = flat(result.output)
    assert "2 complete, 0 pruned, 0 failed" in text and "best: trial" in text
    assert "cross-validation" in text
    trials = pd.read_csv(tmp_path / "t" / "trials.csv")
    assert "param_lr" not in trials.columns  # --lr given: fixed, not searched
    assert (tmp_path / "t" / "trials" / "0000" / "cv.json").is_file()


def test_cli_tune_run_errors(cohort: Path, tmp_path: Path) -> None:
    assert_user_error(
        invoke("tune", "run", cohort, "--num-classes", 3, "--metric", "accuracy"),
        "--metric must be one of",
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: {type: float, low: 1, high: 0.1}\n", encoding="utf-8")
    assert_user_error(
        invoke(
            "tune", "run", cohort, "--num-classes", 3, "--space", bad, "--out-dir", tmp_path / "x"
        ),
        "must be below high",
    )
    assert_user_error(
        invoke(
            "tune",
            "run",
            cohort,
            "--num-classes",
            3,
            "--space",
            tmp_path / "none.yaml",
            "--out-dir",
            tmp_path / "y",
        ),
        "does not exist",
        "omnifuse tune init",
    )
    assert_user_error(
        invoke(
            "tune",
            "run",
            cohort,
            "--num-classes",
            3,
            "--storage",
            "nosuchdb://x",
            "--out-dir",
            tmp_path / "z",
            "--space",
            _space_file(tmp_path),
        ),
        "cannot open the study storage",
    )


def test_nested_cv_estimates_the_procedure(cohort: Path, tmp_path: Path) -> None:
    result = omnifuse.tune(
        cohort, num_classes=3, trials=2, space=SPACE, out_dir=tmp_path / "t", nested_cv=2, **FAST
    )
    nested = pd.read_csv(tmp_path / "t" / "nested.csv")
    assert list(nested["outer_fold"]) == [1, 2]
    assert nested["n_test"].sum() == 54  # the 54 pool patients, each scored once by an outer fold
    assert nested["outer_auroc"].between(0, 1).all()
    summary = json.loads((tmp_path / "t" / "nested.json").read_text())
    assert summary["outer_mean"] == pytest.approx(nested["outer_auroc"].mean())
    assert summary["inner_mean"] == pytest.approx(nested["best_inner_value"].mean())
    # Each outer fold's search is its own study in the same storage; the main study ran too.
    names = {s.study_name for s in optuna.get_all_study_summaries(result.storage)}
    assert names == {"t", "t-outer1", "t-outer2"}


def test_report_of_a_real_tune_folder(tuned: Any) -> None:
    """`omnifuse report` on the folder a real search wrote (test_report_tune.py covers the page
    on hand-built folders): the trials, the best trial and the refit's held-out score."""
    result = invoke("report", tuned.out_dir)
    assert_ok(result)
    page = (tuned.out_dir / "report.html").read_text(encoding="utf-8")
    assert tuned.study_name in page and "optimistic" in page
    assert f"{tuned.refit_test['auroc']:.3f}" in page
    figures = {p.name for p in (tuned.out_dir / "report-figures").glob("*.png")}
    assert figures, "no figure drawn"


def test_a_dead_processs_trial_is_queued_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process killed outright (no Ctrl-C handler ran) leaves its trial RUNNING; once its
    heartbeat is older than the grace period the next process fails it and queues a copy."""
    monkeypatch.setattr(studies, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(studies, "GRACE_SECONDS", 1)
    rdb = studies.open_storage(f"sqlite:///{tmp_path / 'h.db'}")
    study, _ = studies.open_study(rdb, "h", direction="maximize", trials=2, signature={})
    trial_id = studies.claim(study, rdb)
    assert trial_id is not None
    with studies.heartbeat(studies.storage_of(study), trial_id):
        pass  # one beat, then the process "dies"
    studies.fail_stale(study)
    assert studies.counts(study)["running"] == 1  # still within the grace period
    time.sleep(2.2)
    studies.fail_stale(study)
    counts = studies.counts(study)
    assert counts == {**counts, "running": 0, "interrupted": 1, "waiting": 2}
