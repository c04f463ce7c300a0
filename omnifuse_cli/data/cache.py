"""The on-disk cache of frozen-backbone features, keyed by the data and the encoder.

An entry is one folder ``<root>/<modality>-<key[:20]>/`` holding ``features.npy`` (float32,
one row per image or per note, patient after patient), ``offsets.npy`` (int64, where each
patient's rows start; images only) and ``entry.json`` (the key, shapes, sizes and blake2b
checksums). Entries are built in a ``.tmp-*`` folder, ``entry.json`` is written last and the
folder is renamed into place, so a half-written entry (Ctrl-C, a full disk, a crash) is never
found. Opening an entry checks everything ``entry.json`` records; any mismatch means the entry is
rebuilt, never used. What goes into the key, and the content digest an image entry must match
to be served, are data.fingerprints'.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnifuse_cli.data.fingerprints import CHUNK_ROWS, RECORD, new_records

FORMAT_VERSION = 1  # bump when the layout or the meaning of stored features changes
ENV_VAR = "OMNIFUSE_CACHE_DIR"
ENTRY_FILE = "entry.json"
FEATURES_FILE = "features.npy"
OFFSETS_FILE = "offsets.npy"


def default_cache_dir() -> Path:
    """$OMNIFUSE_CACHE_DIR, else $XDG_CACHE_HOME/omnifuse/features, else
    ~/.cache/omnifuse/features."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "omnifuse" / "features"


def entry_key(parts: Mapping[str, Any]) -> str:
    """The entry's key: a hash of its JSON-able description plus the format version."""
    text = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _array_checksum(array: np.ndarray) -> str:
    digest = hashlib.blake2b(digest_size=20)
    for start in range(0, len(array), CHUNK_ROWS):
        digest.update(np.ascontiguousarray(array[start : start + CHUNK_ROWS]).tobytes())
    return digest.hexdigest()


# -- features as the model's batches read them --------------------------------------------------


class FeatureArray:
    """One modality's frozen features: an (items, F) float32 array, in memory or memory-mapped
    from a cache entry, read one patient at a time.

    With ``offsets`` (images) patient i owns rows offsets[i]:offsets[i+1] and gets an
    (n_i, F) tensor; without (hf notes) patient i owns row i and gets an (F,) tensor. Pickling
    (DataLoader workers) sends the file's path, not the features.
    """

    def __init__(
        self, array: np.ndarray, offsets: np.ndarray | None = None, path: Path | None = None
    ) -> None:
        self.array = array
        self.offsets = offsets
        self.path = path

    @classmethod
    def from_rows(
        cls, rows: np.ndarray | torch.Tensor, sizes: Sequence[int] | None = None
    ) -> FeatureArray:
        """In-memory features; ``sizes`` = rows per patient (images)."""
        array = np.asarray(rows, dtype=np.float32)
        return cls(array, None if sizes is None else offsets_from_sizes(sizes))

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])

    def __len__(self) -> int:
        return len(self.offsets) - 1 if self.offsets is not None else len(self.array)

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        if self.offsets is None:
            return torch.from_numpy(np.array(self.array[i], dtype=np.float32))
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        return torch.from_numpy(np.array(self.array[start:stop], dtype=np.float32))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    def rows(self, patients: Iterable[int]) -> torch.Tensor:
        """All rows of these patients, stacked: (sum n_i, F) for images, (len, F) for notes."""
        parts = [self[int(i)].reshape(-1, self.dim) for i in patients]
        return torch.cat(parts) if parts else torch.zeros(0, self.dim)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.path is not None:
            state["array"] = None  # a worker maps the file itself instead of copying the rows
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.array is None and self.path is not None:
            self.array = np.load(self.path / FEATURES_FILE, mmap_mode="r")


def offsets_from_sizes(sizes: Sequence[int]) -> np.ndarray:
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(np.asarray(sizes, dtype=np.int64), out=offsets[1:])
    return offsets


# -- entries ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureCache:
    """A cache folder; ``root`` is created on first write."""

    root: Path

    def entry_dir(self, modality: str, key: str) -> Path:
        return self.root / f"{modality}-{key[:20]}"

    def open(
        self,
        modality: str,
        key: str,
        *,
        verify: bool = True,
        content: Callable[[], str] | None = None,
    ) -> tuple[FeatureArray | None, str | None]:
        """(features, None) for a complete entry; (None, None) when there is none; (None,
        reason) when one is there but damaged or stale (the caller rebuilds it).

        ``content`` (image entries): the inputs' content_digest now, called only once an
        entry is found; the entry is stale unless it recorded the same digest."""
        folder = self.entry_dir(modality, key)
        if not folder.exists():
            return None, None
        try:
            return _open_entry(folder, key, verify=verify, content=content), None
        except (OSError, ValueError, KeyError, TypeError) as err:
            return None, str(err) or type(err).__name__

    def unwritable(self) -> str | None:
        """Why entries cannot be written under root (None when they can)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{uuid.uuid4().hex}"
            probe.mkdir()
            probe.rmdir()
        except OSError as err:
            return err.strerror or str(err)
        return None

    def new_build_dir(self, modality: str, key: str) -> Path:
        """A fresh, private folder to build an entry in (renamed into place by commit)."""
        folder = self.root / f".tmp-{modality}-{key[:20]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        return folder


def _open_entry(
    folder: Path, key: str, *, verify: bool, content: Callable[[], str] | None = None
) -> FeatureArray:
    info_path = folder / ENTRY_FILE
    if not info_path.is_file():
        raise ValueError(f"{ENTRY_FILE} is missing (an incomplete write)")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    if info.get("format") != FORMAT_VERSION:
        raise ValueError(f"format {info.get('format')} is not {FORMAT_VERSION}")
    if info.get("key") != key:
        raise ValueError("its key belongs to other data or another encoder")
    if content is not None:
        # Before the features' checksum: a changed image makes reading the features useless.
        if "content" not in info:
            raise ValueError("it records no digest of the images' content (an older omnifuse)")
        if content() != info["content"]:
            raise ValueError("an image's content changed since it was encoded")
    arrays: dict[str, np.ndarray] = {}
    for name, want in info["files"].items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{name} is missing")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise ValueError(f"{name} has {size} bytes, {want['bytes']} were written")
        array = np.load(path, mmap_mode="r")
        if list(array.shape) != want["shape"] or str(array.dtype) != want["dtype"]:
            raise ValueError(
                f"{name} is {array.dtype} {list(array.shape)}, expected "
                f"{want['dtype']} {want['shape']}"
            )
        if verify and _array_checksum(array) != want["blake2b"]:
            raise ValueError(f"{name} does not match its checksum")
        arrays[name] = array
    offsets = arrays.get(OFFSETS_FILE)
    features = arrays[FEATURES_FILE]
    if offsets is not None:
        offsets = np.asarray(offsets)
        if offsets[0] != 0 or offsets[-1] != len(features) or np.any(np.diff(offsets) < 0):
            raise ValueError(f"{OFFSETS_FILE} does not index {FEATURES_FILE}")
    return FeatureArray(features, offsets, folder)


def create_rows(path: Path, rows: int, dim: int) -> np.memmap:
    """A writable (rows, dim) float32 .npy file, filled block by block.

    Its blocks are reserved up front: writing into a sparse memory map on a full disk kills the
    process with SIGBUS, reserving raises a readable OSError (ENOSPC) before any encoding."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as handle:
            try:
                os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
    return array


def commit(
    cache: FeatureCache,
    build_dir: Path,
    modality: str,
    key: str,
    offsets: np.ndarray | None,
    describe: Mapping[str, Any],
    content: str | None = None,
) -> FeatureArray:
    """Checksum the built files, write entry.json last and move the folder into place. A
    damaged entry already there is replaced; a valid one built meanwhile by another process
    is kept when it recorded the same ``content`` (content_digest of the encoded images)."""
    files: dict[str, dict[str, Any]] = {}
    if offsets is not None:
        np.save(build_dir / OFFSETS_FILE, np.asarray(offsets, dtype=np.int64))
    for name in (FEATURES_FILE, OFFSETS_FILE):
        path = build_dir / name
        if not path.is_file():
            continue
        array = np.load(path, mmap_mode="r")
        files[name] = {
            "bytes": path.stat().st_size,
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "blake2b": _array_checksum(array),
        }
        del array
    info: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "key": key,
        "files": files,
        "describe": dict(describe),
    }
    if content is not None:
        info["content"] = content
    (build_dir / ENTRY_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")
    final = cache.entry_dir(modality, key)
    if final.exists():
        # Checked in full: it may be the damaged or stale one this build replaces.
        found, _ = cache.open(modality, key, content=None if content is None else (lambda: content))
        if found is not None:
            shutil.rmtree(build_dir, ignore_errors=True)
            return _open_entry(final, key, verify=False)
        trash = final.with_name(f".trash-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(build_dir, final)
    except OSError:
        # Another process moved its complete copy into place first: use that one.
        shutil.rmtree(build_dir, ignore_errors=True)
    return _open_entry(final, key, verify=False)


def assemble_records(build_dir: Path, shard_rows: Sequence[int]) -> np.ndarray:
    """Interleave per-rank RECORD shards (rank r hashed for items r, r+W, r+2W, ...) into one
    array in view order (40 bytes a view: read whole), then remove the shards."""
    world = len(shard_rows)
    records = new_records(int(sum(shard_rows)))
    for r in range(world):
        shard = np.load(records_path(build_dir, r))
        if shard.dtype != RECORD or shard.shape != (shard_rows[r],):
            raise ValueError(f"digests of rank {r} are {shard.dtype} {list(shard.shape)}")
        records[r::world] = shard
    for r in range(world):
        records_path(build_dir, r).unlink()
    return records


def assemble_shards(build_dir: Path, shard_rows: Sequence[int], dim: int) -> None:
    """Interleave per-rank shards (rank r encoded items r, r+W, r+2W, ...) into one features
    file, a block at a time, then remove the shards."""
    world = len(shard_rows)
    total = int(sum(shard_rows))
    out = create_rows(build_dir / FEATURES_FILE, total, dim)
    for r in range(world):
        shard = np.load(shard_path(build_dir, r), mmap_mode="r")
        if shard.shape != (shard_rows[r], dim):
            raise ValueError(
                f"shard of rank {r} is {list(shard.shape)}, expected {[shard_rows[r], dim]}"
            )
        for start in range(0, len(shard), CHUNK_ROWS):
            block = shard[start : start + CHUNK_ROWS]
            first = r + world * start
            out[first : first + world * len(block) : world] = block
        del shard
    out.flush()
    del out
    for r in range(world):
        shard_path(build_dir, r).unlink()


def shard_path(build_dir: Path, rank: int) -> Path:
    return build_dir / f"shard-{rank}.npy"


def records_path(build_dir: Path, rank: int) -> Path:
    """Where rank ``rank`` leaves the RECORDs of the image files it hashed while encoding."""
    return build_dir / f"records-{rank}.npy"


def discard(build_dir: Path) -> None:
    shutil.rmtree(build_dir, ignore_errors=True)
