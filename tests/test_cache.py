"""The on-disk frozen-feature cache (data/cache.py, engine/frozen_features.py)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import Result

from omnifuse_cli.config import ImageConfig
from omnifuse_cli.data.cache import (
    ENTRY_FILE,
    FEATURES_FILE,
    FeatureArray,
    FeatureCache,
    default_cache_dir,
)
from omnifuse_cli.data.fingerprints import files_content
from omnifuse_cli.data.manifest import read_manifest
from omnifuse_cli.engine.frozen_features import cache_frozen_features
from omnifuse_cli.engine.training import build_for_cohort
from omnifuse_cli.model.encoders import ImageEncoder
from tests import helpers
from tests.conftest import tiny_request
from tests.helpers import TINY_RUN, assert_ok

CPU = torch.device("cpu")
SMALL = ImageConfig(backbone="resnet18", image_size=32, pretrained="no")
N_IMAGES = 27  # views in the tiny cohort (conftest.build_tiny_cohort)


class Encoded:
    """One cache_frozen_features call: the messages it sent and how many images it encoded."""

    def __init__(
        self,
        manifest: Path,
        cache: FeatureCache | None,
        monkeypatch: pytest.MonkeyPatch,
        *,
        image: ImageConfig = SMALL,
        model: Any = None,
        tamper: Any = None,
        num_workers: int = 0,
        watch: Any = None,
    ) -> None:
        request = tiny_request(manifest, manifest.parent / "unused", image=image)
        cohort = read_manifest(manifest, request.data.modalities, num_classes=3)
        torch.manual_seed(0)
        built, pre, _ = build_for_cohort(cohort, np.arange(len(cohort)), request)
        self.model = model or built
        if tamper:
            tamper(self.model)
        self.data = pre.prepare(cohort)
        self.messages: list[str] = []
        self.encoded = 0
        real = ImageEncoder.forward_features

        def counting(encoder: ImageEncoder, pixels: torch.Tensor) -> torch.Tensor:
            self.encoded += len(pixels)
            return real(encoder, pixels)

        with monkeypatch.context() as patch:
            patch.setattr(ImageEncoder, "forward_features", counting)
            if watch:  # patches that watch the encoding alone, not reading the manifest
                watch(patch)
            cache_frozen_features(
                self.model,
                self.data,
                ["us"],
                device=CPU,
                batch_size=8,
                amp=False,
                cache=cache,
                notify=self.messages.append,
                num_workers=num_workers,
            )
        self.features = self.data.image_cache["us"]

    def said(self, text: str) -> bool:
        return any(text in m for m in self.messages)

    def flat(self) -> np.ndarray:
        return np.asarray(self.features.array)


def entries(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if not p.name.startswith("."))


def test_a_second_encode_reuses_the_entry_and_equals_encoding_in_memory(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = FeatureCache(tmp_path / "cache")
    first = Encoded(tiny_manifest, cache, monkeypatch)
    assert first.encoded == N_IMAGES and first.said("cached us features in")
    assert [len(f) for f in first.features] == [len(p) for p in first.data.images["us"]]
    (entry,) = entries(cache.root)
    assert {p.name for p in entry.iterdir()} == {FEATURES_FILE, "offsets.npy", ENTRY_FILE}
    assert isinstance(first.features.array, np.memmap)  # read from disk, not held in RAM

    second = Encoded(tiny_manifest, cache, monkeypatch)
    assert second.encoded == 0
    assert second.messages == [f"reusing cached us features from {entry}"]
    memory = Encoded(tiny_manifest, None, monkeypatch)
    assert memory.encoded == N_IMAGES and memory.messages == []
    np.testing.assert_array_equal(second.flat(), first.flat())
    np.testing.assert_allclose(memory.flat(), first.flat(), rtol=1e-5, atol=1e-6)
    for i in range(len(memory.features)):
        torch.testing.assert_close(second.features[i], memory.features[i])


def test_the_key_follows_image_size_backbone_weights_and_files(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = FeatureCache(tmp_path / "cache")
    Encoded(tiny_manifest, cache, monkeypatch)
    bigger = Encoded(
        tiny_manifest,
        cache,
        monkeypatch,
        image=ImageConfig(backbone="resnet18", image_size=40, pretrained="no"),
    )
    assert bigger.encoded == N_IMAGES and len(entries(cache.root)) == 2

    def nudge(model: Any) -> None:
        with torch.no_grad():
            next(model.encoders["us"].backbone.parameters()).view(-1)[0] += 1.0

    other_weights = Encoded(tiny_manifest, cache, monkeypatch, tamper=nudge)
    assert other_weights.encoded == N_IMAGES and len(entries(cache.root)) == 3

    copy = tmp_path / "cohort"
    shutil.copytree(tiny_manifest.parent, copy)
    moved = Encoded(copy / "manifest.csv", cache, monkeypatch)  # same pixels, other paths
    assert moved.encoded == N_IMAGES and len(entries(cache.root)) == 4
    again = Encoded(copy / "manifest.csv", cache, monkeypatch)
    assert again.encoded == 0
    image = next((copy / "us").glob("*.png"))
    os.utime(image, ns=(1_000_000_000, 1_000_000_000))  # an edited (re-saved) image
    edited = Encoded(copy / "manifest.csv", cache, monkeypatch)
    assert edited.encoded == N_IMAGES and len(entries(cache.root)) == 5


def _truncate(entry: Path) -> None:
    path = entry / FEATURES_FILE
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 100)


def _flip(entry: Path) -> None:
    path = entry / FEATURES_FILE
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # same size and shape: only the checksum can tell
    path.write_bytes(bytes(raw))


def _no_manifest(entry: Path) -> None:
    (entry / ENTRY_FILE).unlink()  # as if Ctrl-C had hit before the entry was complete


def _wrong_shape(entry: Path) -> None:
    info = json.loads((entry / ENTRY_FILE).read_text())
    info["files"][FEATURES_FILE]["shape"][0] += 1
    (entry / ENTRY_FILE).write_text(json.dumps(info))


@pytest.mark.parametrize("damage", [_truncate, _flip, _no_manifest, _wrong_shape])
def test_a_damaged_entry_is_rebuilt_not_used(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: Any
) -> None:
    cache = FeatureCache(tmp_path / "cache")
    first = Encoded(tiny_manifest, cache, monkeypatch)
    want = first.flat().copy()
    (entry,) = entries(cache.root)
    del first
    damage(entry)
    rebuilt = Encoded(tiny_manifest, cache, monkeypatch)
    assert rebuilt.encoded == N_IMAGES
    assert rebuilt.said(f"cached us features in {entry} are damaged or stale")
    np.testing.assert_array_equal(rebuilt.flat(), want)
    assert entries(cache.root) == [entry] and not list(cache.root.glob(".*"))
    assert Encoded(tiny_manifest, cache, monkeypatch).encoded == 0  # whole again


def test_an_unwritable_folder_warns_and_runs_without_cache(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    run = Encoded(tiny_manifest, FeatureCache(blocker / "cache"), monkeypatch)
    assert run.encoded == N_IMAGES
    (message,) = run.messages
    assert message.startswith(f"feature cache folder {blocker / 'cache'} is not writable (")
    assert "--cache-dir" in message and "--no-cache" in message
    assert not isinstance(run.features.array, np.memmap)
    memory = Encoded(tiny_manifest, None, monkeypatch)
    np.testing.assert_array_equal(run.flat(), memory.flat())


def test_an_interrupted_build_leaves_no_entry(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = FeatureCache(tmp_path / "cache")
    calls = []

    def stop(self: Any, pixels: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return torch.zeros(len(pixels), 512)

    monkeypatch.setattr(ImageEncoder, "forward_features", stop)
    with pytest.raises(KeyboardInterrupt):
        Encoded(tiny_manifest, cache, monkeypatch)
    monkeypatch.undo()
    assert list(cache.root.iterdir()) == []
    assert Encoded(tiny_manifest, cache, monkeypatch).encoded == N_IMAGES


def test_features_pickle_as_a_path_for_dataloader_workers(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = Encoded(tiny_manifest, FeatureCache(tmp_path / "cache"), monkeypatch)
    raw = pickle.dumps(run.features)
    assert len(raw) < run.flat().nbytes / 4
    back = pickle.loads(raw)
    assert isinstance(back.array, np.memmap)
    for i in range(len(back)):
        torch.testing.assert_close(back[i], run.features[i])
    memory = FeatureArray.from_rows(np.ones((3, 2)), [2, 0, 1])
    assert [tuple(f.shape) for f in pickle.loads(pickle.dumps(memory))] == [(2, 2), (0, 2), (1, 2)]
    assert tuple(memory.rows([0, 2]).shape) == (3, 2)


def test_default_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OMNIFUSE_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("OMNIFUSE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "omnifuse" / "features"


# -- the commands -------------------------------------------------------------------------------

TRAIN_ARGS = ["--num-classes", "3", "--epochs", "2", *TINY_RUN, "--tla-min-patients", "1"]


def invoke(*args: str) -> Result:
    """`omnifuse ARGS`, which must succeed. 250 columns, not helpers' 200: the cache lines name
    long tmp paths that rich would wrap."""
    result = helpers.invoke(*args, width=250)
    assert_ok(result)
    return result


def test_train_reuses_the_cache_and_matches_a_run_without_it(
    tiny_manifest: Path, tmp_path: Path
) -> None:
    import pandas as pd

    cache = tmp_path / "cache"
    first = invoke(
        "train",
        str(tiny_manifest),
        "--out-dir",
        str(tmp_path / "a"),
        *TRAIN_ARGS,
        "--cache-dir",
        str(cache),
    )
    (entry,) = entries(cache)
    assert f"cached us features in {entry}" in first.output
    second = invoke(
        "train",
        str(tiny_manifest),
        "--out-dir",
        str(tmp_path / "b"),
        *TRAIN_ARGS,
        "--cache-dir",
        str(cache),
    )
    assert f"reusing cached us features from {entry}" in second.output
    unused = tmp_path / "unused"
    plain = invoke(
        "train",
        str(tiny_manifest),
        "--out-dir",
        str(tmp_path / "c"),
        *TRAIN_ARGS,
        "--no-cache",
        "--cache-dir",
        str(unused),
    )
    assert "cached" not in plain.output and not unused.exists()
    metrics = [pd.read_csv(tmp_path / run / "metrics.csv").drop(columns="seconds") for run in "abc"]
    pd.testing.assert_frame_equal(metrics[0], metrics[1])
    pd.testing.assert_frame_equal(metrics[0], metrics[2], rtol=1e-4)

    evaluated = invoke(
        "evaluate",
        str(tmp_path / "a"),
        "--bootstrap",
        "0",
        "--device",
        "cpu",
        "--cache-dir",
        str(cache),
    )
    assert f"reusing cached us features from {entry}" in evaluated.output
    again = invoke(
        "evaluate",
        str(tmp_path / "a"),
        "--bootstrap",
        "0",
        "--device",
        "cpu",
        "--no-cache",
        "--out-dir",
        str(tmp_path / "eval-plain"),
    )
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "a" / "eval" / "test" / "predictions.csv"),
        pd.read_csv(tmp_path / "eval-plain" / "predictions.csv"),
        rtol=1e-4,
    )
    assert "cached" not in again.output
    fresh = tmp_path / "fresh"  # a test split alone is not worth encoding the whole cohort for
    split_only = invoke(
        "evaluate",
        str(tmp_path / "a"),
        "--bootstrap",
        "0",
        "--device",
        "cpu",
        "--cache-dir",
        str(fresh),
        "--out-dir",
        str(tmp_path / "eval-fresh"),
    )
    assert "cached" not in split_only.output and not fresh.exists()
    predicted = invoke(
        "predict",
        str(tiny_manifest),
        "--run",
        str(tmp_path / "a"),
        "--out",
        str(tmp_path / "p.csv"),
        "--device",
        "cpu",
        "--cache-dir",
        str(cache),
    )
    assert f"reusing cached us features from {entry}" in predicted.output
    resumed = invoke("train", "--resume", str(tmp_path / "a"))  # its --cache-dir is in the run
    assert f"reusing cached us features from {entry}" in resumed.output
    assert len(entries(cache)) == 1


def test_cv_encodes_once_into_one_entry_for_every_fold(tiny_manifest: Path, tmp_path: Path) -> None:
    from tests.conftest import CV_ARGS

    cache = tmp_path / "cache"
    args = [*CV_ARGS, "--epochs", "1", "--bootstrap", "0", "--cache-dir", str(cache)]
    first = invoke("cv", str(tiny_manifest), "--out-dir", str(tmp_path / "cv1"), *args)
    (entry,) = entries(cache)
    assert first.output.count("cached us features in") == 1
    second = invoke("cv", str(tiny_manifest), "--out-dir", str(tmp_path / "cv2"), *args)
    assert f"reusing cached us features from {entry}" in second.output
    assert entries(cache) == [entry]


# -- torchrun: two processes share the encoding -------------------------------------------------


_FORKED: dict[str, Any] = {}  # what the forked ranks inherit: the model and the cohort


def _rank_worker(rank: int, cache_dir: str, out: str) -> None:
    """One process of a 2-process gloo group (as torchrun would start): encode through the
    cache and save what this rank got."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    try:
        model, data = _FORKED["model"], _FORKED["data"]
        messages: list[str] = []
        cache_frozen_features(
            model,
            data,
            ["us"],
            device=CPU,
            batch_size=4,
            amp=False,
            cache=FeatureCache(Path(cache_dir)),
            notify=messages.append,
        )
        np.save(Path(out) / f"rank{rank}.npy", np.asarray(data.image_cache["us"].array))
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(messages))
    finally:
        dist.destroy_process_group()


def _spawn(run: Encoded, cache: Path, out: Path) -> list[list[str]]:
    import torch.multiprocessing as mp

    out.mkdir()
    _FORKED.update(model=run.model, data=run.data)
    # fork: the ranks start at once with the same model instead of importing torch and
    # building it again (tens of seconds on a busy 2-core machine); the parent holds no
    # process group and runs one intra-op thread.
    mp.start_processes(
        _rank_worker, args=(str(cache), str(out)), nprocs=2, join=True, start_method="fork"
    )
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_processes_encode_half_each_and_share_one_entry(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    memory = Encoded(tiny_manifest, None, monkeypatch)
    said = _spawn(memory, cache, tmp_path / "first")
    (entry,) = entries(cache)
    assert said == [[f"cached us features in {entry} (encoded by 2 processes)"], []]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no shards, no debris
    ranks = [np.load(tmp_path / "first" / f"rank{r}.npy") for r in range(2)]
    np.testing.assert_array_equal(ranks[0], ranks[1])
    np.testing.assert_allclose(ranks[0], memory.flat(), rtol=1e-5, atol=1e-6)
    # The digests the two ranks took while encoding combine into that of the files on disk.
    views = [v for patient in memory.data.images["us"] for v in patient]
    assert json.loads((entry / ENTRY_FILE).read_text())["content"] == files_content(views)
    alone = Encoded(tiny_manifest, FeatureCache(cache), monkeypatch)  # one process, same entry
    assert alone.encoded == 0 and alone.said("reusing cached us features")
    again = _spawn(memory, cache, tmp_path / "again")
    assert again == [[f"reusing cached us features from {entry}"], []]


def test_hf_notes_are_cached_one_row_per_patient(tiny_manifest: Path, tmp_path: Path) -> None:
    from omnifuse_cli.config import TextConfig
    from tests.conftest import tiny_bert

    folder = tiny_bert(tmp_path / "bert")
    cache = FeatureCache(tmp_path / "cache")

    def encode(max_length: int, use: FeatureCache | None) -> tuple[FeatureArray, list[str]]:
        request = tiny_request(
            tiny_manifest,
            tmp_path / "unused",
            image=SMALL,
            text=TextConfig(encoder="hf", model=str(folder), max_length=max_length),
        )
        cohort = read_manifest(tiny_manifest, request.data.modalities, num_classes=3)
        torch.manual_seed(0)
        model, pre, _ = build_for_cohort(cohort, np.arange(len(cohort)), request)
        data = pre.prepare(cohort)
        said: list[str] = []
        cache_frozen_features(
            model,
            data,
            ["text"],
            device=CPU,
            batch_size=8,
            amp=False,
            cache=use,
            notify=said.append,
        )
        return data.text_cache["text"], said

    first, said = encode(32, cache)
    assert len(first) == 30 and tuple(first[0].shape) == (32,) and first.offsets is None
    assert said[0].startswith("cached text features in")
    second, said = encode(32, cache)
    assert said[0].startswith("reusing cached text features from")
    memory, _ = encode(32, None)
    np.testing.assert_allclose(
        np.asarray(second.array), np.asarray(memory.array), rtol=1e-5, atol=1e-6
    )
    _, said = encode(8, cache)  # shorter notes: other tokens, another entry
    assert said[0].startswith("cached text features in") and len(entries(cache.root)) == 2


def test_token_fingerprint_of_flat_storage_equals_the_list_form():
    from omnifuse_cli.data.fingerprints import tokens_fingerprint
    from omnifuse_cli.data.prepared import Ragged

    rows = [[3, 1, 4], [], [1, 5, 9, 2, 6], [5]]
    flat = Ragged.from_lists(rows, np.int32)
    assert tokens_fingerprint(flat) == tokens_fingerprint(rows)
    assert tokens_fingerprint(
        Ragged.from_lists([[3, 1, 4], [1], [5, 9, 2, 6], [5]], np.int32)
    ) != tokens_fingerprint(flat)  # same tokens, other note boundaries


# -- no silent staleness (issue 19) -----------------------------------------------------------


def _copy_cohort(tiny_manifest: Path, tmp_path: Path) -> tuple[Path, Path]:
    copy = tmp_path / "cohort"
    shutil.copytree(tiny_manifest.parent, copy)
    return copy / "manifest.csv", next(iter(sorted((copy / "us").glob("*.png"))))


def _same_size_other_pixels(image: Path) -> None:
    """Replace an image by another of exactly the same byte size, then give it back the old
    modification time (a restore from backup, `cp -p`): only the content differs."""
    st = image.stat()
    raw = bytearray(image.read_bytes())
    from PIL import Image

    with Image.open(image) as img:
        pixels = np.asarray(img.convert("L"))
    other = image.with_name("other.png")
    size = len(raw)
    for value in range(256):  # a flat image, padded with PNG-ignored trailing bytes
        Image.fromarray(np.full_like(pixels, value)).save(other)
        if other.stat().st_size <= size:
            break
    data = other.read_bytes()
    other.unlink()
    assert len(data) <= size and data != bytes(raw[: len(data)])
    image.write_bytes(data + b"\0" * (size - len(data)))
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert image.stat().st_size == st.st_size and image.stat().st_mtime_ns == st.st_mtime_ns


def test_a_replaced_image_with_the_same_size_and_mtime_encodes_again(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, image = _copy_cohort(tiny_manifest, tmp_path)
    cache = FeatureCache(tmp_path / "cache")
    first = Encoded(manifest, cache, monkeypatch)
    assert first.encoded == N_IMAGES
    _same_size_other_pixels(image)
    again = Encoded(manifest, cache, monkeypatch)
    assert again.encoded == N_IMAGES  # the old features are not served as current
    assert not np.array_equal(again.flat(), first.flat())


@pytest.mark.skipif(os.name == "nt", reason="symlinks need extra privileges on Windows")
def test_a_re_pointed_symlink_encodes_again(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, image = _copy_cohort(tiny_manifest, tmp_path)
    store = tmp_path / "store"
    store.mkdir()
    a, b = store / "a.png", store / "b.png"
    shutil.copy2(image, a)
    shutil.copy2(image, b)
    _same_size_other_pixels(b)
    os.utime(b, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns))
    image.unlink()
    image.symlink_to(a)
    cache = FeatureCache(tmp_path / "cache")
    assert Encoded(manifest, cache, monkeypatch).encoded == N_IMAGES
    assert Encoded(manifest, cache, monkeypatch).encoded == 0  # unchanged: reused
    image.unlink()
    image.symlink_to(b)  # the same name, size and mtime: another file
    assert Encoded(manifest, cache, monkeypatch).encoded == N_IMAGES


@pytest.mark.parametrize("module", ["torchvision", "PIL", "torch"])
def test_another_library_version_encodes_again(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    import importlib

    cache = FeatureCache(tmp_path / "cache")
    assert Encoded(tiny_manifest, cache, monkeypatch).encoded == N_IMAGES
    assert Encoded(tiny_manifest, cache, monkeypatch).encoded == 0
    lib = importlib.import_module(module)
    monkeypatch.setattr(lib, "__version__", lib.__version__ + ".other")
    assert Encoded(tiny_manifest, cache, monkeypatch).encoded == N_IMAGES


def test_another_preprocessing_version_encodes_again(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omnifuse_cli.data import images

    cache = FeatureCache(tmp_path / "cache")
    assert Encoded(tiny_manifest, cache, monkeypatch).encoded == N_IMAGES
    monkeypatch.setattr(images, "PREPROCESSING_VERSION", images.PREPROCESSING_VERSION + 1)
    assert Encoded(tiny_manifest, cache, monkeypatch).encoded == N_IMAGES


def test_views_per_patient_and_precision_are_part_of_the_key(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omnifuse_cli.engine import frozen_features

    cache = FeatureCache(tmp_path / "cache")
    assert Encoded(tiny_manifest, cache, monkeypatch).encoded == N_IMAGES
    keys: list[dict] = []
    real = frozen_features._features

    def spy(job, *args, **kwargs):  # type: ignore[no-untyped-def]
        keys.append(dict(job.parts))
        return real(job, *args, **kwargs)

    monkeypatch.setattr(frozen_features, "_features", spy)
    Encoded(tiny_manifest, cache, monkeypatch)
    parts = keys[-1]
    assert {"views", "precision", "versions", "files"} <= set(parts)
    from omnifuse_cli.data.cache import entry_key
    from omnifuse_cli.data.fingerprints import tokens_fingerprint

    moved = {**parts, "views": tokens_fingerprint([[1] * N_IMAGES])}  # same files, regrouped
    assert entry_key(moved) != entry_key(parts)
    assert entry_key({**parts, "precision": "bf16"}) != entry_key(parts)


# -- the images' content decides a hit (issue: "a content hash of every image") ----------------


def _stat_blind(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stat fingerprint that cannot see a replacement (the same inode and times after a
    restore, a filesystem without a reliable ctime, Windows' creation-time ctime): only the
    names count, so the key finds the old entry and the content alone must tell."""
    from omnifuse_cli.engine import frozen_features

    monkeypatch.setattr(
        frozen_features, "files_fingerprint", lambda paths: "|".join(os.fspath(p) for p in paths)
    )


def _entry_content(cache: FeatureCache) -> str:
    (entry,) = entries(cache.root)
    return json.loads((entry / ENTRY_FILE).read_text())["content"]


def _views(run: Encoded) -> list:
    return [v for patient in run.data.images["us"] for v in patient]


def test_other_bytes_behind_the_same_stat_key_encode_again(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _stat_blind(monkeypatch)
    manifest, image = _copy_cohort(tiny_manifest, tmp_path)
    cache = FeatureCache(tmp_path / "cache")
    first = Encoded(manifest, cache, monkeypatch)
    (entry,) = entries(cache.root)
    _same_size_other_pixels(image)
    again = Encoded(manifest, cache, monkeypatch)
    assert again.encoded == N_IMAGES
    assert again.said(f"cached us features in {entry} are damaged or stale (an image's content")
    assert entries(cache.root) == [entry]  # the stale entry was replaced, not kept beside it
    memory = Encoded(manifest, None, monkeypatch)
    np.testing.assert_allclose(again.flat(), memory.flat(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(again.flat(), first.flat())
    assert Encoded(manifest, cache, monkeypatch).encoded == 0  # the new entry is current


def test_a_hit_reads_each_file_once_and_decodes_none(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    from omnifuse_cli.data import images

    cache = FeatureCache(tmp_path / "cache")
    first = Encoded(tiny_manifest, cache, monkeypatch)
    files = {os.path.abspath(v) for v in _views(first)}
    opened: list[str] = []
    real_open = builtins.open

    def spy(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) in files:
            opened.append(os.path.abspath(file))
        return real_open(file, mode, *args, **kwargs)

    def no_decoding(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cache hit decoded an image")

    def watch(patch: pytest.MonkeyPatch) -> None:
        patch.setattr(builtins, "open", spy)
        patch.setattr(images, "load_image", no_decoding)

    hit = Encoded(tiny_manifest, cache, monkeypatch, watch=watch)
    assert hit.encoded == 0 and hit.said("reusing cached us features")
    assert sorted(opened) == sorted(files)  # hashed: every file once, and no file twice


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_digest_taken_while_encoding_is_the_digest_of_the_files(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, num_workers: int
) -> None:
    from omnifuse_cli.data import images

    decoded: list[bool] = []
    real = images.load_image

    def from_memory(view: Any, transform: Any, data: bytes | None = None) -> torch.Tensor:
        decoded.append(data is not None)
        return real(view, transform, data)

    monkeypatch.setattr(images, "load_image", from_memory)
    cache = FeatureCache(tmp_path / "cache")
    first = Encoded(tiny_manifest, cache, monkeypatch, num_workers=num_workers)
    assert first.encoded == N_IMAGES
    if num_workers == 0:  # the spy is not seen inside worker processes
        assert decoded == [True] * N_IMAGES  # every image decoded from the bytes it hashed
    assert _entry_content(cache) == files_content(_views(first))
    assert Encoded(tiny_manifest, cache, monkeypatch).encoded == 0


def test_an_entry_without_a_content_digest_is_not_served(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = FeatureCache(tmp_path / "cache")
    Encoded(tiny_manifest, cache, monkeypatch)
    (entry,) = entries(cache.root)
    info = json.loads((entry / ENTRY_FILE).read_text())
    del info["content"]  # as an older omnifuse wrote it
    (entry / ENTRY_FILE).write_text(json.dumps(info))
    again = Encoded(tiny_manifest, cache, monkeypatch)
    assert again.encoded == N_IMAGES
    assert again.said("it records no digest of the images' content")
    assert "content" in json.loads((entry / ENTRY_FILE).read_text())


def test_dicom_files_are_hashed_from_the_bytes_they_are_decoded_from(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pydicom = pytest.importorskip("pydicom")
    from omnifuse_cli.data import images
    from omnifuse_cli.data.images import DicomFrame

    _stat_blind(monkeypatch)
    manifest, _ = _copy_cohort(tiny_manifest, tmp_path)
    shipped = Path(pydicom.data.__file__).with_name("test_files")
    ct = manifest.parent / "us" / "ct.dcm"  # uncompressed: pixel bytes can be edited in place
    shutil.copy(shipped / "CT_small.dcm", ct)
    shutil.copy(shipped / "examples_ybr_color.dcm", manifest.parent / "us" / "cine.dcm")
    text = manifest.read_text(encoding="utf-8")
    assert "us/1002_0.png;us/1002_1.png" in text and "us/1004_0.png|" in text
    text = text.replace("us/1002_0.png;us/1002_1.png", "us/cine.dcm")  # 30 frames
    manifest.write_text(text.replace("us/1004_0.png|", "us/ct.dcm|"), encoding="utf-8")

    reads: list[tuple[str, int, bool]] = []
    real = images.read_frame

    def spy(path: Path, frame: int = 0, *, data: bytes | None = None) -> Any:
        reads.append((Path(path).name, frame, data is not None))
        return real(path, frame, data=data)

    monkeypatch.setattr(images, "read_frame", spy)
    cache = FeatureCache(tmp_path / "cache")
    first = Encoded(manifest, cache, monkeypatch)
    frames = [v.index for v in _views(first) if isinstance(v, DicomFrame)]
    assert len(frames) > 1 and first.encoded == len(_views(first))
    # The cine file is read and hashed once, at its first frame; its other frames are read
    # by themselves. The CT file is decoded from the bytes that were hashed.
    assert sorted(reads) == sorted(
        [("ct.dcm", 0, True), ("cine.dcm", frames[0], True)]
        + [("cine.dcm", k, False) for k in frames[1:]]
    )
    assert _entry_content(cache) == files_content(_views(first))
    assert Encoded(manifest, cache, monkeypatch).encoded == 0

    row = next(i for i, v in enumerate(_views(first)) if Path(v) == ct)
    raw = bytearray(ct.read_bytes())
    raw[-4000:] = bytes(255 - b for b in raw[-4000:])  # other pixels, same size
    ct.write_bytes(bytes(raw))
    again = Encoded(manifest, cache, monkeypatch)
    assert again.encoded == len(_views(first))
    assert not np.allclose(again.flat()[row], first.flat()[row])
    np.testing.assert_array_equal(np.delete(again.flat(), row, 0), np.delete(first.flat(), row, 0))
