"""What decides a cached feature entry: the key that finds a candidate, and the digest of the
image files' content that decides whether it is served (data.cache stores the entries).

The key hashes what decides the features: the modality, the image files (path, resolved path,
size, mtime, inode, ctime) or the note tokens, how many views each patient has, the image size,
the backbone's weights, the compute precision, the versions of omnifuse, its preprocessing,
torch, torchvision, Pillow (and pydicom for DICOM inputs) and the cache's format version.

The key only finds a candidate: file times are no proof of content (Windows' ctime is the
creation time, a restore may keep inode and times, some filesystems keep no reliable ctime).
An image entry also records a digest of every image file's bytes, computed from the very bytes
that were decoded for encoding; a candidate is served only when the files, hashed again (one
read, no decoding), give the same digest. An image entry without a digest is never served.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, cast

import numpy as np
import PIL
import torch

from omnifuse_cli import __version__

# prepared imports data.cache, which imports this module: the import is for annotations only
if TYPE_CHECKING:
    from omnifuse_cli.data.prepared import Ragged

CHUNK_ROWS = 8192  # rows hashed or copied at a time: memory stays bounded for any cohort
_READ_BYTES = 1 << 20  # an image file is hashed a block at a time: any size fits in memory
# Image bytes are hashed with sha256: CPUs with SHA instructions (most x86 and ARM servers and
# laptops of recent years) hash it about three times as fast as blake2b, and on a cache hit
# hashing is most of the added cost.
DIGEST_SIZE = 32
# One row per view: its file's length and digest_of(its bytes), or size -1 where the view was
# not hashed (a later view of a file already hashed: a cine loop's other frames).
RECORD = np.dtype([("size", "<i8"), ("digest", "u1", (DIGEST_SIZE,))])


def files_fingerprint(paths: Iterable[os.PathLike[str] | str]) -> str:
    """Hash of each file's absolute path, the file it resolves to (a re-pointed symlink is
    another file), its size, modification time, inode and status-change time: most replaced or
    edited images change the key without reading any bytes, so their stale entry is not even
    opened. It only finds a candidate entry: the content digest decides (see the module's
    docstring). A frame of a multi-frame file (an os.PathLike with an ``index``,
    data.images.DicomFrame) is the file plus its frame number."""
    digest = hashlib.blake2b(digest_size=20)
    for path in paths:
        name = os.path.abspath(path)
        frame = getattr(path, "index", None)
        if frame is not None:
            digest.update(f"#{frame}".encode())
        try:
            st = os.stat(name)
            stamp = (
                f"{os.path.realpath(name)}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:"
                f"{st.st_ctime_ns}"
            )
        except OSError:
            stamp = "missing"
        digest.update(f"{name}\0{stamp}\n".encode())
    return digest.hexdigest()


def code_versions(images: bool = False) -> dict[str, str]:
    """The versions that decide what a frozen backbone makes of an input: omnifuse and torch;
    for images also its preprocessing (data.images.PREPROCESSING_VERSION), torchvision, Pillow
    and pydicom when it is installed (finding out whether a cohort holds DICOM files would
    mean opening every file). Part of every cache key: upgrading any of them encodes again
    rather than serving features another version computed."""
    out = {"omnifuse": __version__, "torch": torch.__version__}
    if images:
        # Here: torchvision is heavy (images only), and data.images imports this module.
        import torchvision

        from omnifuse_cli.data.images import PREPROCESSING_VERSION

        out.update(
            {
                "preprocessing": str(PREPROCESSING_VERSION),
                "torchvision": torchvision.__version__,
                "Pillow": PIL.__version__,
            }
        )
        try:
            import pydicom  # heavy: only its version, and only for images
        except ImportError:  # the dicom extra is not installed: no DICOM input can be read
            pass
        else:
            out["pydicom"] = pydicom.__version__
    return out


def digest_of(data: bytes) -> bytes:
    """The digest of one image file's bytes (what data.images.HashedImageFiles computes from
    the bytes it decodes)."""
    return hashlib.sha256(data).digest()


def file_record(path: os.PathLike[str] | str) -> tuple[int, bytes]:
    """(length, digest_of(bytes)) of a file, read a block at a time and not decoded."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_READ_BYTES), b""):
            digest.update(block)
            size += len(block)
    return size, digest.digest()


def first_views(paths: Sequence[os.PathLike[str] | str]) -> np.ndarray:
    """(views,) bool: True at the first view of each file. Only those are hashed, so a file
    shared by several views (a cine loop's frames) is read for hashing once."""
    seen: set[str] = set()
    first = np.zeros(len(paths), dtype=bool)
    for i, path in enumerate(paths):
        name = os.path.abspath(path)
        if name not in seen:
            seen.add(name)
            first[i] = True
    return first


def new_records(rows: int) -> np.ndarray:
    """RECORDs for ``rows`` views, none hashed yet."""
    records = np.zeros(rows, dtype=RECORD)
    records["size"] = -1
    return records


def content_digest(paths: Sequence[os.PathLike[str] | str], records: np.ndarray) -> str:
    """The digest of the image files' content: the per-file digests in ``records`` (one row
    per view, RECORD), taken at each file's first view in view order and framed by that
    position and the file's length. Files hashed in any order (DataLoader workers, several
    ranks) give the same digest."""
    digest = hashlib.sha256()
    for i in np.flatnonzero(first_views(paths)):
        size = int(records["size"][i])
        if size < 0:
            raise ValueError(f"the file of view {i} was not hashed")
        digest.update(f"{i}:{size}\n".encode())
        digest.update(records["digest"][i].tobytes())
    return digest.hexdigest()


def files_content(paths: Sequence[os.PathLike[str] | str]) -> str:
    """content_digest of the files as they are on disk now: each read once, none decoded."""
    records = new_records(len(paths))
    for i in np.flatnonzero(first_views(paths)):
        size, digest = file_record(paths[int(i)])
        records["size"][i] = size
        records["digest"][i] = np.frombuffer(digest, dtype=np.uint8)
    return content_digest(paths, records)


def tokens_fingerprint(seqs: Sequence[Sequence[int]] | Ragged) -> str:
    """Hash of every note's token ids (content, cheap: they are already in memory), a block of
    notes at a time so a million notes never become one huge array."""
    digest = hashlib.blake2b(digest_size=20)
    offsets = getattr(seqs, "offsets", None)
    if offsets is not None:  # data.prepared.Ragged: the same bytes straight from its arrays
        values = cast("Ragged", seqs).values
        for start in range(0, len(seqs), CHUNK_ROWS):
            bounds = offsets[start : start + CHUNK_ROWS + 1]
            digest.update(np.diff(bounds).astype(np.int64).tobytes())
            digest.update(values[bounds[0] : bounds[-1]].astype(np.int64).tobytes())
        return digest.hexdigest()
    for start in range(0, len(seqs), CHUNK_ROWS):
        block = seqs[start : start + CHUNK_ROWS]
        lengths = np.fromiter((len(s) for s in block), dtype=np.int64, count=len(block))
        digest.update(lengths.tobytes())
        digest.update(
            np.fromiter(
                (t for s in block for t in s), dtype=np.int64, count=int(lengths.sum())
            ).tobytes()
        )
    return digest.hexdigest()


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """Hash of a module's weights and buffers (names, dtypes, shapes and bytes)."""
    digest = hashlib.blake2b(digest_size=20)
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
