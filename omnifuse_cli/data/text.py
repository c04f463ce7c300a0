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

PAD, UNK = "<pad>", "<unk>"
_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_PIECES = re.compile(rf"[{_CJK}]+|[^\W{_CJK}]+", re.UNICODE)
_IS_CJK = re.compile(rf"[{_CJK}]")


def tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    for piece in _PIECES.findall(text.lower()):
        if _IS_CJK.match(piece):
            tokens.extend(piece)
            tokens.extend(piece[i : i + 2] for i in range(len(piece) - 1))
        else:
            tokens.append(piece)
    return tokens


def fit_vocabulary(texts: Iterable[str | None], *, size: int, min_freq: int
                   ) -> tuple[list[str], list[float]]:
    """Most frequent tokens (ties broken alphabetically, so the result is deterministic) and
    their smoothed inverse document frequency, as scikit-learn's TfidfVectorizer computes it."""
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
