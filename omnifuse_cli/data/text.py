"""The offline ``simple`` text tokenizer: CJK character uni/bi-grams plus lower-cased words.

Chinese has no spaces, so characters and character pairs carry the meaning a word tokenizer
would; Latin-script words are kept whole. The vocabulary is fitted on the training split only
and saved in the bundle.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable

import numpy as np

PAD, UNK = "<pad>", "<unk>"
_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_PIECES = re.compile(rf"[{_CJK}]+|[^\W{_CJK}]+", re.UNICODE)
_IS_CJK = re.compile(rf"[{_CJK}]")


def tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    for piece in _PIECES.findall(text.lower()):
        if _IS_CJK.match(piece):
            tokens.extend(piece)
            tokens.extend(map(str.__add__, piece, piece[1:]))  # character pairs
        else:
            tokens.append(piece)
    return tokens


def fit_vocabulary(texts: Iterable[str | None], *, size: int, min_freq: int
                   ) -> tuple[list[str], list[float]]:
    """Most frequent tokens (ties broken alphabetically, so the result is deterministic) and
    their smoothed inverse document frequency, as scikit-learn's TfidfVectorizer computes it.

    One streaming pass: ``texts`` may be a generator, and only the two counters (one entry per
    distinct token) are kept, never the tokens of all notes."""
    counts: Counter[str] = Counter()
    docs: Counter[str] = Counter()
    n_docs = 0
    for text in texts:
        if text:
            tokens = tokenize(text)
            counts.update(tokens)
            docs.update(set(tokens))
            n_docs += 1
    ranked = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
    vocab = [PAD, UNK, *ranked[: size - 2]]
    idf = [0.0, 1.0] + [math.log((1 + n_docs) / (1 + docs[t])) + 1.0 for t in vocab[2:]]
    return vocab, idf


def encode(text: str | None, index: dict[str, int], idf: list[float], max_length: int
           ) -> tuple[list[int], list[float]]:
    """Distinct token ids of a note and their idf weights, scaled to unit length (tf-idf with
    binary term frequency), so long notes full of neutral sentences do not drown findings."""
    if not text:
        return [], []
    unk = index[UNK]
    ids = sorted({index.get(t, unk) for t in tokenize(text)})[:max_length]
    weights = [idf[i] for i in ids]
    norm = math.sqrt(sum(w * w for w in weights)) or 1.0
    return ids, [w / norm for w in weights]


NOTE_CHUNK = 65_536  # notes encoded and normalised together before they move to numpy


def encode_many(texts: Iterable[str | None], index: dict[str, int], idf: list[float],
                max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``encode`` for a whole cohort, stored flat: (ids int32, weights float32, offsets int64)
    with note i's ids at ``ids[offsets[i]:offsets[i + 1]]`` (an empty range without a note).
    The same numbers as ``encode`` note by note, at 4 + 4 bytes per token instead of two
    Python lists per patient. Notes are normalised a chunk at a time, so the float64 and
    index temporaries of the arithmetic never span the cohort (at a million notes they would
    add gigabytes to the peak)."""
    unk = index[UNK]
    idf_array = np.asarray(idf, dtype=np.float64)
    id_parts: list[np.ndarray] = []
    weight_parts: list[np.ndarray] = []
    lengths: list[int] = []
    chunk: list[int] = []
    chunk_lengths: list[int] = []

    def flush() -> None:
        ids = np.array(chunk, dtype=np.int32)
        weights = idf_array[ids]
        # Unit length per note; bincount adds each note's squares in order, like encode's sum.
        owner = np.repeat(np.arange(len(chunk_lengths)), chunk_lengths)
        norms = np.sqrt(np.bincount(owner, weights=weights * weights,
                                    minlength=len(chunk_lengths)))
        norms[norms == 0] = 1.0
        id_parts.append(ids)
        weight_parts.append((weights / norms[owner]).astype(np.float32))
        lengths.extend(chunk_lengths)
        chunk.clear()
        chunk_lengths.clear()

    for text in texts:
        # Distinct tokens first: a note repeats many characters, each looked up once.
        ids = sorted({index.get(t, unk) for t in set(tokenize(text))})[:max_length] if text else []
        chunk.extend(ids)
        chunk_lengths.append(len(ids))
        if len(chunk_lengths) >= NOTE_CHUNK:
            flush()
    flush()
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(id_parts)
    id_parts.clear()  # the parts go as soon as their copy exists: one array's worth extra
    weights = np.concatenate(weight_parts)
    weight_parts.clear()
    return flat, weights, offsets
