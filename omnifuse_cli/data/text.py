"""The offline ``simple`` text tokenizer: CJK character uni/bi-grams plus lower-cased words.

Chinese has no spaces, so characters and character pairs carry the meaning a word tokenizer
would; Latin-script words are kept whole. The vocabulary is fitted on the training split only
and saved in the bundle.
"""

from __future__ import annotations

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


def fit_vocabulary(texts: Iterable[str | None], *, size: int, min_freq: int) -> list[str]:
    """Most frequent tokens (ties broken alphabetically, so the result is deterministic)."""
    counts: Counter[str] = Counter()
    for text in texts:
        if text:
            counts.update(tokenize(text))
    ranked = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
    return [PAD, UNK, *ranked[: size - 2]]


def encode(text: str | None, index: dict[str, int], max_length: int) -> list[int]:
    if not text:
        return []
    unk = index[UNK]
    return [index.get(t, unk) for t in tokenize(text)][:max_length]
