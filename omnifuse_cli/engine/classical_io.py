"""The ensemble's classical members in a bundle (engine/classical.py): one skops file per member
and members.json. Loading never unpickles: skops builds only the types in TRUSTED (beside those
it trusts itself), so a bundle from elsewhere cannot run code; anything else is a BundleError.
skops is imported inside the two functions: training without the preset, and predicting
without its members, never need it."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import sklearn
from sklearn.decomposition import TruncatedSVD
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from omnifuse_cli.engine.classical import KINDS, NAMES, FittedMember, FoldModel, MemberKind
from omnifuse_cli.engine.files import temp_file_beside, write_text_atomic
from omnifuse_cli.errors import BundleError

MEMBERS_FILE = "members.json"
FORMAT = "omnifuse-classical-members"
FORMAT_VERSION = 1

# What skops.io.get_untrusted_types reports for fitted members beyond the types skops trusts
# itself (tests/test_ensemble.py checks every kind against it, so a scikit-learn release that
# stores a new type fails there, not in a user's bundle). Nothing else is ever built on load.
TRUSTED: tuple[str, ...] = (
    "numpy.dtype",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
)


def save_members(folder: Path, members: list[FittedMember]) -> None:
    """One ``<name>.skops`` per member and ``members.json`` listing them, atomically each."""
    # skops only writes and reads bundles of the best preset: imported where it is needed.
    import skops
    import skops.io as sio

    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for member in members:
        folds = [{k: v for k, v in f.__dict__.items() if k != "trained_on"} for f in member.folds]
        payload = sio.dumps({"kind": member.kind, "folds": folds})
        _write_bytes_atomic(folder / f"{member.name}.skops", payload)
        entries.append(
            {
                "name": member.name,
                "kind": member.kind,
                "classes": list(range(member.num_classes)),
                "numbers": member.number_count,
                "meta": member.meta(),
            }
        )
    versions = {"scikit-learn": sklearn.__version__, "skops": skops.__version__}
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions}
    document["members"] = entries
    write_text_atomic(folder / MEMBERS_FILE, json.dumps(document, indent=2) + "\n")


def load_members(folder: Path) -> list[FittedMember]:
    """The members save_members wrote, built from nothing but TRUSTED and skops' own safe
    types; BundleError naming the file for anything else, or a missing or damaged file."""
    # skops only writes and reads bundles of the best preset: imported where it is needed.
    import skops.io as sio
    from skops.io.exceptions import UntrustedTypesFoundException

    listing = folder / MEMBERS_FILE
    try:
        document = json.loads(listing.read_text(encoding="utf-8"))
        if document.get("format") != FORMAT:
            raise ValueError("not an omnifuse members file")
        entries = [
            (e["kind"], e["name"], len(e["classes"]), int(e["numbers"]), e.get("meta"))
            for e in document["members"]
        ]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BundleError(f"cannot read {listing}: {exc}") from exc
    members = []
    for kind, name, num_classes, number_count, meta in entries:
        if kind not in KINDS or name != NAMES[kind]:  # names a file: never a path from the JSON
            raise BundleError(f"{listing} lists an unknown member {name!r}")
        path = folder / f"{NAMES[kind]}.skops"
        try:
            payload = sio.load(path, trusted=list(TRUSTED))
        except UntrustedTypesFoundException as exc:
            raise BundleError(
                f"{path} holds types a bundle may not contain: {exc}",
                hint="loading would build objects beyond scikit-learn's; use a bundle you trust",
            ) from exc
        except (OSError, zipfile.BadZipFile, ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"cannot read {path}: {exc}") from exc
        folds = _fold_models(payload, kind, path)
        seconds = float(meta.get("seconds", 0.0)) if isinstance(meta, dict) else 0.0
        members.append(FittedMember(kind, num_classes, number_count, folds, seconds))
    return members


_PIECES: dict[str, type[object]] = {
    "tfidf": TfidfVectorizer,
    "svd": TruncatedSVD,
    "imputer": SimpleImputer,
    "scaler": StandardScaler,
}
_ESTIMATORS: dict[MemberKind, type[object]] = {
    "linear": LogisticRegression,
    "hgb": HistGradientBoostingClassifier,
}


def _fold_models(payload: object, kind: MemberKind, path: Path) -> tuple[FoldModel, ...]:
    """The fold models of a loaded payload, each piece checked to be what it claims."""
    folds = payload.get("folds") if isinstance(payload, dict) else None
    if not isinstance(payload, dict) or payload.get("kind") != kind or not folds:
        raise BundleError(f"{path} does not hold a {NAMES[kind]} member")
    wanted = {**_PIECES, "estimator": _ESTIMATORS[kind]}
    models = []
    for fold in folds:
        if not isinstance(fold, dict) or not isinstance(fold.get("estimator"), wanted["estimator"]):
            raise BundleError(f"{path}: a fold model is not a {wanted['estimator'].__name__}")
        wrong = [k for k, t in wanted.items() if not isinstance(fold.get(k), (t, type(None)))]
        selected = fold.get("selected")
        if selected is not None and not (
            isinstance(selected, np.ndarray) and selected.dtype.kind == "i"
        ):
            wrong.append("selected")
        try:
            if wrong:
                raise TypeError(", ".join(wrong))
            models.append(FoldModel(**fold))
        except TypeError as exc:
            raise BundleError(f"{path}: a fold model has unexpected parts ({exc})") from exc
    return tuple(models)


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = temp_file_beside(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
