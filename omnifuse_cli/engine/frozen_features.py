"""Frozen-backbone features: every image and hf note encoded once by its frozen backbone,
written to (or reused from) the on-disk feature cache of data/cache.py, or held in memory."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader

from omnifuse_cli import __version__
from omnifuse_cli.config import TrainConfig
from omnifuse_cli.data.cache import (
    FEATURES_FILE,
    FeatureArray,
    FeatureCache,
    assemble_records,
    assemble_shards,
    commit,
    create_rows,
    default_cache_dir,
    discard,
    entry_key,
    offsets_from_sizes,
    records_path,
    shard_path,
)
from omnifuse_cli.data.fingerprints import (
    code_versions,
    content_digest,
    files_content,
    files_fingerprint,
    first_views,
    new_records,
    state_fingerprint,
    tokens_fingerprint,
)
from omnifuse_cli.data.images import HashedImageFiles, View
from omnifuse_cli.data.prepared import PreparedCohort, Ragged, collate_tokens, move_to
from omnifuse_cli.engine import distributed
from omnifuse_cli.engine.events import EventFn, ProgressEvent
from omnifuse_cli.engine.inference import ProgressFn, autocast
from omnifuse_cli.errors import DataError
from omnifuse_cli.model.bag import BaggedOmniFuse
from omnifuse_cli.model.encoders import HFTextEncoder, ImageEncoder
from omnifuse_cli.model.omnifuse import OmniFuse


def feature_cache(cache_dir: str | Path | None, enabled: bool = True) -> FeatureCache | None:
    """The cache folder a command uses: --cache-dir, else the default; None with --no-cache."""
    if not enabled:
        return None
    return FeatureCache(Path(cache_dir).expanduser() if cache_dir else default_cache_dir())


@dataclass
class _Job:
    """One modality's frozen encoding: what decides its features and how to compute a subset."""

    name: str
    rows: int  # images (all patients' views, flat) or notes (one per patient)
    dim: int
    offsets: np.ndarray | None  # images: where each patient's rows start
    parts: dict[str, Any]  # the cache key's ingredients
    # (rows, out, report, hashing) fills out in row order; with hashing (an entry will record
    # the digest) images also return the RECORDs of the files they hashed
    encode: Callable[[range, np.ndarray, ProgressFn | None, bool], np.ndarray | None]
    files: list[View] | None = None  # images: the views, whose files' bytes decide a hit

    def content(self, records: np.ndarray | None) -> str | None:
        """The digest an entry records: of the image bytes encode read, None for notes."""
        if self.files is None or records is None:
            return None
        return content_digest(self.files, records)

    def content_now(self) -> Callable[[], str] | None:
        """What a found entry's digest must equal: the image files as they are now."""
        files = self.files
        return None if files is None else (lambda: files_content(files))


@torch.no_grad()
def cache_frozen_features(
    model: OmniFuse | BaggedOmniFuse,
    data: PreparedCohort,
    names: list[str],
    *,
    device: torch.device,
    batch_size: int,
    amp: bool,
    progress: ProgressFn | None = None,
    num_workers: int = 0,
    cache: FeatureCache | None = None,
    notify: Callable[[str], None] | None = None,
    reuse_only: bool = False,
) -> None:
    """Encode every image and hf note once with the frozen backbones (streamed from disk).

    With a ``cache`` the features are written to, or reused from, an entry keyed by the data and
    the backbone's weights, and read memory-mapped; without, they are held in memory. An image
    entry is reused only while its files' bytes hash to the digest taken when they were
    encoded. Under
    torchrun each rank encodes every world_size-th item and rank 0 assembles the entry.
    The global random state is left as it was (a DataLoader draws its seed from it): a run that
    reuses the cache trains exactly like one that encoded. ``reuse_only``: take complete
    entries, encode nothing (modalities without one keep reading their raw inputs).
    """
    with torch.random.fork_rng(devices=[]):
        _cache_frozen_features(
            model,
            data,
            names,
            device=device,
            batch_size=batch_size,
            amp=amp,
            progress=progress,
            num_workers=num_workers,
            cache=cache,
            notify=notify,
            reuse_only=reuse_only,
        )


def encode_frozen(
    model: OmniFuse,
    data: PreparedCohort,
    names: list[str],
    cfg: TrainConfig,
    device: torch.device,
    emit: EventFn,
) -> None:
    """cache_frozen_features with a run's settings (batch size, precision, workers, cache
    folder), its progress and messages as events: what train and cv both do before fitting."""
    cache_frozen_features(
        model,
        data,
        names,
        device=device,
        batch_size=cfg.encode_batch_size,
        amp=cfg.amp,
        progress=lambda d, t: emit(ProgressEvent("encode", d, t)),
        num_workers=cfg.num_workers,
        cache=feature_cache(cfg.cache_dir, cfg.cache),
        notify=lambda text: emit(ProgressEvent("message", text=text)),
    )


def _cache_frozen_features(
    model: OmniFuse | BaggedOmniFuse,
    data: PreparedCohort,
    names: list[str],
    *,
    device: torch.device,
    batch_size: int,
    amp: bool,
    progress: ProgressFn | None,
    num_workers: int,
    cache: FeatureCache | None,
    notify: Callable[[str], None] | None,
    reuse_only: bool,
) -> None:
    model.eval()
    say = notify or (lambda text: None)
    precision = "bf16" if amp and device.type == "cuda" else "fp32"
    for name in names:
        # names are the frozen (cacheable) encoders: image trunks and hf text models.
        encoder = cast(ImageEncoder | HFTextEncoder, model.encoders[name])
        common = {
            "modality": name,
            "backbone": type(encoder.backbone).__name__,
            "weights": state_fingerprint(encoder.backbone.state_dict()),
            "feature_dim": encoder.feature_dim,
            "precision": precision,
        }
        if isinstance(encoder, ImageEncoder):
            paths = [p for patient in data.images[name] for p in patient]
            sizes = [len(patient) for patient in data.images[name]]
            offsets = offsets_from_sizes(sizes)
            parts = {
                **common,
                "kind": "image",
                "files": files_fingerprint(paths),
                "views": tokens_fingerprint([sizes]),
                "image_size": data.image_size,
                "transform": "resize+center-crop+imagenet-normalize",
                "versions": code_versions(images=True),
            }

            def encode_images(
                items: range,
                out: np.ndarray,
                report: ProgressFn | None,
                hashing: bool,
                encoder: ImageEncoder = encoder,
                paths: list[View] = paths,
            ) -> np.ndarray:
                # Which views hash their file is decided on the whole list, so that under
                # torchrun each file is hashed once, by whichever rank encodes its first view.
                first = first_views(paths) if hashing else np.zeros(len(paths), dtype=bool)
                files = DataLoader(
                    HashedImageFiles(
                        [paths[i] for i in items], data.image_size, [bool(first[i]) for i in items]
                    ),
                    batch_size=batch_size,
                    num_workers=num_workers,
                )
                records = new_records(len(items))
                row = 0
                for k, (pixels, sizes, digests) in enumerate(files):
                    with autocast(device, amp):
                        feats = encoder.forward_features(pixels.to(device))
                    out[row : row + len(feats)] = feats.float().cpu().numpy()
                    records["size"][row : row + len(feats)] = sizes.numpy()
                    records["digest"][row : row + len(feats)] = digests.numpy()
                    row += len(feats)
                    if report:
                        report(k + 1, len(files))
                return records

            job = _Job(name, len(paths), encoder.feature_dim, offsets, parts, encode_images, paths)
            feats = _features(job, cache, say, progress, reuse_only)
            if feats is not None:
                data.image_cache[name] = feats
                data.image_feature_dims[name] = encoder.feature_dim
        elif isinstance(encoder, HFTextEncoder):
            seqs, pad = data.token_ids[name], data.pad_ids[name]
            parts = {
                **common,
                "kind": "text",
                "tokens": tokens_fingerprint(seqs),
                "pad": pad,
                "versions": code_versions(),
            }

            def encode_notes(
                items: range,
                out: np.ndarray,
                report: ProgressFn | None,
                hashing: bool,  # notes' content is their tokens, already in the key
                encoder: HFTextEncoder = encoder,
                seqs: Ragged = seqs,
                pad: int = pad,
            ) -> None:
                chosen = [seqs[i] for i in items]
                for k in range(0, len(chosen), batch_size):
                    tokens = collate_tokens(chosen[k : k + batch_size], pad, hf=True)
                    with autocast(device, amp):
                        feats = encoder.forward_features(move_to(tokens, device))
                    out[k : k + len(feats)] = feats.float().cpu().numpy()
                    if report:
                        report(min(k + batch_size, len(chosen)), len(chosen))

            job = _Job(name, len(seqs), encoder.feature_dim, None, parts, encode_notes)
            feats = _features(job, cache, say, progress, reuse_only)
            if feats is not None:
                data.text_cache[name] = feats


def _in_memory(job: _Job, progress: ProgressFn | None) -> FeatureArray:
    out = np.empty((job.rows, job.dim), dtype=np.float32)
    job.encode(range(job.rows), out, progress, False)
    return FeatureArray(out, job.offsets)


def _describe(job: _Job) -> dict[str, Any]:
    keep = ("modality", "kind", "backbone", "feature_dim", "image_size", "precision")
    return {
        **{k: job.parts[k] for k in keep if k in job.parts},
        "rows": job.rows,
        "patients": len(job.offsets) - 1 if job.offsets is not None else job.rows,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "omnifuse": __version__,
    }


def _write_failed(cache: FeatureCache, err: OSError) -> DataError:
    return DataError(
        f"could not write the feature cache under {cache.root}: {err}",
        hint="free disk space, choose another folder with --cache-dir, or run with --no-cache",
    )


def _features(
    job: _Job,
    cache: FeatureCache | None,
    say: Callable[[str], None],
    progress: ProgressFn | None,
    reuse_only: bool = False,
) -> FeatureArray | None:
    key = entry_key(job.parts)
    if distributed.active():
        return _features_distributed(job, key, cache, say, progress)
    if cache is None or job.rows == 0:
        return _in_memory(job, progress)
    folder = cache.entry_dir(job.name, key)
    found, damaged = cache.open(job.name, key, content=job.content_now())
    if found is not None:
        say(f"reusing cached {job.name} features from {folder}")
        return found
    if reuse_only:
        return None
    if damaged:
        say(
            f"cached {job.name} features in {folder} are damaged or stale ({damaged}); "
            "encoding them again"
        )
    problem = cache.unwritable()
    if problem:
        say(
            f"feature cache folder {cache.root} is not writable ({problem}): {job.name} "
            "features are kept in memory for this run only (choose a writable folder with "
            "--cache-dir, or silence this with --no-cache)"
        )
        return _in_memory(job, progress)
    build = cache.new_build_dir(job.name, key)
    try:
        out = create_rows(build / FEATURES_FILE, job.rows, job.dim)
        records = job.encode(range(job.rows), out, progress, True)
        out.flush()
        del out
        entry = commit(
            cache, build, job.name, key, job.offsets, _describe(job), job.content(records)
        )
    except OSError as err:
        discard(build)
        raise _write_failed(cache, err) from err
    except BaseException:
        discard(build)  # Ctrl-C or a failing file: no half-built entry is left behind
        raise
    say(f"cached {job.name} features in {folder}")
    return entry


def _features_distributed(
    job: _Job,
    key: str,
    cache: FeatureCache | None,
    say: Callable[[str], None],
    progress: ProgressFn | None,
) -> FeatureArray:
    """Rank 0 looks the entry up; on a miss rank r encodes items r, r+W, ... into its shard,
    rank 0 interleaves the shards into the entry and every rank then maps it.

    Rank 0's key names the entry (nodes may mount the same files under other paths; that the
    ranks read the same data is checked before, by distributed.check_same_data). Rank 0 alone
    hashes the image files to check a found entry; on a build each rank hashes the files of
    the views it encodes and rank 0 combines their digests. A failure on any rank is raised
    on every rank, so none waits in a collective for the others.
    """
    world, rank = distributed.world_size(), distributed.rank()
    key = distributed.broadcast_object(key)
    if rank != 0:
        say = lambda text: None  # noqa: E731 - rank 0 alone reports
    if cache is None or job.rows == 0:
        return _in_memory(job, progress)
    decision: list[Any] = [None, None, None]
    if rank == 0:
        found, damaged = cache.open(job.name, key, content=job.content_now())
        problem = None if found is not None else cache.unwritable()
        if found is not None:
            decision = ["hit", None, None]
        elif problem:
            decision = ["memory", problem, damaged]
        else:
            decision = ["build", str(cache.new_build_dir(job.name, key)), damaged]
    action, detail, damaged = distributed.broadcast_object(decision)
    folder = cache.entry_dir(job.name, key)
    shared_hint = (
        "every rank must see the same --cache-dir (a folder shared by all nodes), or "
        "run with --no-cache"
    )
    if action == "memory":
        say(
            f"feature cache folder {cache.root} is not writable ({detail}): every rank keeps "
            f"its own {job.name} features in memory (choose a writable shared folder with "
            "--cache-dir, or silence this with --no-cache)"
        )
        return _in_memory(job, progress)
    if action == "build":
        if damaged:
            say(
                f"cached {job.name} features in {folder} are damaged or stale ({damaged}); "
                "encoding them again"
            )
        build = Path(detail)
        mine = range(rank, job.rows, world)
        error: Exception | None = None
        try:
            shard = create_rows(shard_path(build, rank), len(mine), job.dim)
            records = job.encode(mine, shard, progress, True)
            shard.flush()
            del shard
            if records is not None:
                np.save(records_path(build, rank), records)
        except Exception as err:  # reported to every rank below, then raised
            error = err
        failures = distributed.all_gather_object(None if error is None else str(error))
        failed = [f"rank {r}: {f}" for r, f in enumerate(failures) if f]
        if rank == 0 and not failed:
            try:
                shard_rows = [len(range(r, job.rows, world)) for r in range(world)]
                assemble_shards(build, shard_rows, job.dim)
                records = assemble_records(build, shard_rows) if job.files is not None else None
                commit(
                    cache, build, job.name, key, job.offsets, _describe(job), job.content(records)
                )
            except (OSError, ValueError) as err:
                failed.append(f"rank 0: {err}")
        if rank == 0 and failed:
            discard(build)
        failed = distributed.broadcast_object(failed)
        if error is not None:
            raise error
        if failed:
            raise DataError(
                f"could not build the shared feature cache under {cache.root} "
                f"({'; '.join(failed)})",
                hint=shared_hint,
            )
        say(f"cached {job.name} features in {folder} (encoded by {world} processes)")
    else:
        say(f"reusing cached {job.name} features from {folder}")
    found, reason = cache.open(job.name, key, verify=False)
    if found is None:
        raise DataError(
            f"rank {rank} cannot read the feature cache entry {folder} "
            f"({reason or 'it is not there'})",
            hint=shared_hint,
        )
    return found


def reuse_frozen_features(
    model: OmniFuse | BaggedOmniFuse,
    data: PreparedCohort,
    rows: np.ndarray,
    *,
    device: torch.device,
    batch_size: int,
    cache: FeatureCache | None,
    notify: Callable[[str], None] | None = None,
    progress: ProgressFn | None = None,
) -> None:
    """evaluate/predict: take the backbones' features from the cache (a run's own test split
    finds the entry its training wrote). When every patient is scored a missing entry is
    encoded and stored; when only some ``rows`` are (a test split) it is not, since that would
    encode the whole cohort to score a tenth of it. Without a cache nothing happens: infer
    encodes batch by batch, holding no features."""
    names = [n for n, e in model.encoders.items() if isinstance(e, (ImageEncoder, HFTextEncoder))]
    if cache is not None and names:
        cache_frozen_features(
            model,
            data,
            names,
            device=device,
            batch_size=batch_size,
            amp=True,
            cache=cache,
            notify=notify,
            reuse_only=len(rows) < len(data),
            progress=progress,
        )
