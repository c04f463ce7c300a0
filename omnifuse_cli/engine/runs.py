"""The one owner of a run folder: the names of its files, the request that started it (saved
for --resume and read back into configs), its key-value metadata (meta.csv), and finding a run.
Training, cross-validation, evaluation, prediction, the report, the bundle and the API all name
a run's files through here.

Cheap to import (no torch, and pandas only where a table is read or written): the CLI takes its
file names from here while `omnifuse --help` runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from omnifuse_cli.config import (
    DataConfig,
    MethodConfig,
    TrainConfig,
    from_primitive,
    to_primitive,
)
from omnifuse_cli.engine.files import write_csv, write_text_atomic
from omnifuse_cli.errors import BundleError

if TYPE_CHECKING:  # annotations only; pandas loads where a table is read
    import pandas as pd

# -- the files of a run (train) and of a cross-validation folder ------------------------------
BUNDLE_DIR = "model"  # the self-contained model (engine/bundle.py)
REQUEST = "request.json"  # every setting of the run, so --resume needs nothing else
CV_FILE = "cv.json"  # cv's request; it is also what marks a folder as cv output
FINAL_DIR = "final"  # cv --refit's model: a run folder inside the cv folder
CONFIG_YAML = "config.yaml"  # the same settings in the CLI's --config format
CHECKPOINT = "checkpoint.pt"  # state after the last complete epoch, for --resume
META = "meta.csv"  # key,value: data, settings, versions, weights, timings (written last)
METRICS = "metrics.csv"  # one row per epoch (train); pooled metrics (cv, evaluate)
SPLIT = "split.csv"  # patients per split
SPLIT_ASSIGNMENT = "split_assignment.csv"  # each patient's split (or fold) and label
SPLITS_SUMMARY = "splits_summary.csv"  # patients per class and missing pattern in each split
TEST = "test.csv"  # the internal test split's metrics (test_<metric>)
CONFUSION = "confusion_matrix.csv"
PREDICTIONS = "predictions.csv"
OOF = "oof_predictions.csv"  # --bag-folds: each training patient's out-of-fold probabilities
# A tune folder (omnifuse_cli/tuning writes it, report/ reads it; tuning/request.py has the rest)
TUNE_JSON = "tune.json"  # the search; it is also what marks a folder as tune output
TRIALS_CSV = "trials.csv"  # one row per trial (param_<name> columns)
INTERMEDIATE_CSV = "intermediate.csv"  # every trial's per-epoch validation score
BEST_JSON = "best.json"
BEST_YAML = "best.yaml"  # the best settings as a --config file of train
REFIT_DIR = "refit"  # tune --refit's model: a run folder inside the tune folder
NESTED_CSV = "nested.csv"
NESTED_JSON = "nested.json"


@dataclass(frozen=True)
class TrainRequest:
    """What `omnifuse train` was asked: the data, where the run goes, and the settings."""

    manifest: Path
    num_classes: int
    out_dir: Path
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    overwrite: bool = False
    # The resolved settings as YAML, saved beside request.json as config.yaml (the --config
    # format, so a run can be repeated from it); None writes no config.yaml.
    config_yaml: str | None = None


class Request(Protocol):
    """A saved request: TrainRequest or cv's CVRequest."""

    @property
    def out_dir(self) -> Path: ...
    @property
    def manifest(self) -> Path: ...
    @property
    def config_yaml(self) -> str | None: ...


R = TypeVar("R")


def _absolute_labs_tables(raw: Any) -> None:
    """Every data section's labs table as an absolute path, so the request reads from anywhere."""
    if isinstance(raw, dict):
        table = raw.get("labs_table")
        if "modalities" in raw and table:
            raw["labs_table"] = str(Path(table).resolve())
        for value in raw.values():
            _absolute_labs_tables(value)
    elif isinstance(raw, list):
        for value in raw:
            _absolute_labs_tables(value)


def save_request(request: Request, file_name: str = REQUEST, *, kind: str | None = None) -> None:
    """config.yaml (when the request carries one) and the request as JSON primitives, with the
    manifest and labs tables made absolute."""
    folder = Path(request.out_dir)
    if request.config_yaml is not None:
        write_text_atomic(folder / CONFIG_YAML, request.config_yaml)
    raw = to_primitive(request)
    del raw["config_yaml"]
    raw["manifest"] = str(Path(request.manifest).resolve())
    raw["out_dir"] = str(request.out_dir)
    _absolute_labs_tables(raw)
    if kind is not None:
        raw["kind"] = kind
    text = json.dumps(raw, ensure_ascii=False, indent=1, default=str)
    write_text_atomic(folder / file_name, text)


def load_request(
    cls: type[R], folder: Path, file_name: str = REQUEST, *, what: str = "run", command: str = ""
) -> R:
    """The request saved in ``folder``, as ``cls``, ready to resume (it writes into the folder
    it was found in, whatever its saved out_dir says)."""
    path = Path(folder) / file_name
    if not path.is_file():
        raise BundleError(
            f"{folder} is not a resumable {what} (no {file_name})",
            hint=f"pass the folder that `omnifuse {command or 'train'} --out-dir` wrote",
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        raw.pop("kind", None)
        raw["out_dir"] = str(folder)
        raw["overwrite"] = True
        return from_primitive(cls, raw)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise BundleError(f"{path} is damaged: {err}") from err


def load_train_request(run_dir: Path) -> TrainRequest:
    """The request a training run was started with (for --resume)."""
    return load_request(TrainRequest, run_dir, REQUEST, what="run", command="train")


def write_meta(folder: Path, values: dict[str, Any]) -> None:
    """meta.csv: one key,value row per entry (values as text)."""
    import pandas as pd  # here: the CLI imports this module for the file names alone

    frame = pd.DataFrame({"key": list(values), "value": [str(v) for v in values.values()]})
    write_csv(Path(folder) / META, frame)


def read_key_values(path: Path) -> dict[str, str]:
    """A key,value CSV (meta.csv) as a dict; {} when the file does not exist."""
    import pandas as pd  # here: the CLI imports this module for the file names alone

    if not Path(path).is_file():
        return {}
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return dict(zip(frame["key"], frame["value"], strict=True))


def read_meta(run_dir: Path) -> dict[str, str]:
    """The run's meta.csv as key -> value (users may edit paths in it after moving data)."""
    if not (Path(run_dir) / META).is_file():
        bundle_folder(run_dir)  # the clearer error when this is not a run at all
        raise BundleError(
            f"{run_dir} has no {META}; was training interrupted before the end?",
            hint="evaluate an external cohort with --manifest instead",
        )
    return read_key_values(Path(run_dir) / META)


def read_split_assignment(run_dir: Path) -> pd.DataFrame:
    """split_assignment.csv as text columns."""
    import pandas as pd  # here: the CLI imports this module for the file names alone

    path = Path(run_dir) / SPLIT_ASSIGNMENT
    if not path.is_file():
        raise BundleError(f"{run_dir} has no {SPLIT_ASSIGNMENT}")
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def bundle_folder(run_or_bundle: Path) -> Path:
    """Accept a run directory or the bundle folder itself."""
    path = Path(run_or_bundle)
    if (path / "bundle.json").is_file():
        return path
    if (path / BUNDLE_DIR / "bundle.json").is_file():
        return path / BUNDLE_DIR
    if not path.exists():
        raise BundleError(f"run directory {path} does not exist")
    raise BundleError(
        f"{path} is not an omnifuse run (no {BUNDLE_DIR}/bundle.json inside)",
        hint="pass the folder that `omnifuse train --out-dir` wrote",
    )


def find_latest_run(root: Path = Path("runs")) -> Path:
    """The most recently trained run under ``root`` (by its bundle's modification time)."""
    bundles = sorted(
        Path(root).glob(f"*/{BUNDLE_DIR}/bundle.json"), key=lambda p: p.stat().st_mtime
    )
    if not bundles:
        raise BundleError(
            f"no trained run found under {Path(root).resolve()}",
            hint="train one with `omnifuse train MANIFEST --num-classes C`, or pass --run RUN_DIR",
        )
    return bundles[-1].parent.parent
