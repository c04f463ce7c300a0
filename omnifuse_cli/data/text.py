"""Notes: decoding note files in whatever encoding the export used, and the offline ``simple``
text tokenizer (CJK character uni/bi-grams plus lower-cased words).

Chinese has no spaces, so characters and character pairs carry the meaning a word tokenizer
would; Latin-script words are kept whole. The vocabulary is fitted on the training split only
and saved in the bundle.
"""

from __future__ import annotations

import codecs
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from charset_normalizer import from_bytes

from omnifuse_cli.errors import ConfigError

# -- decoding -----------------------------------------------------------------------------------

AUTO = "auto"
_BOMS = (  # UTF-32 first: its little-endian BOM starts with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
# Without a BOM and not UTF-8, a hospital export is almost always Windows-1252 (which reads
# Latin-1 text the same) or GB18030 (which reads GBK and GB2312). Both accept most byte strings,
# so the choice is made on what the decoded text looks like, never by a fixed fallback.
_WESTERN, _CHINESE = "cp1252", "gb18030"
_CJK_CHAR = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")
_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")


@dataclass(frozen=True)
class Decoded:
    """A decoded note: its text, the encoding that read it, and whether that was a guess (no BOM,
    not UTF-8, no --encoding) that `check` should name."""

    text: str
    encoding: str
    guessed: bool = False


def check_encoding(name: str) -> str:
    """--encoding's value, normalised; a ConfigError names an encoding Python does not know."""
    value = name.strip().lower()
    if value == AUTO:
        return value
    try:
        return codecs.lookup(value).name
    except LookupError:
        raise ConfigError(
            f"--encoding {name!r} is not an encoding Python knows",
            hint="use auto, or e.g. utf-8, utf-16, gb18030, cp1252, latin-1",
        ) from None


def decode_note(raw: bytes, encoding: str = AUTO) -> Decoded:
    """The text of a note file. ``auto``: a BOM decides (UTF-8/16/32); else strict UTF-8; else
    UTF-16 recognised by its zero bytes; else Windows-1252 or GB18030, whichever reading looks
    like text of its script (charset-normalizer breaks a tie). Raises ValueError with the reason
    when the bytes are not text in the given encoding, or when auto cannot tell, or when
    the result is no text (control characters, unassigned or private-use code points: what
    garbage decodes to)."""
    decoded = _decode(raw, encoding)
    for ch in set(decoded.text):
        if (
            (ch < " " and ch not in "\t\n\r\f")
            or ("\x7f" <= ch <= "\x9f")
            or (ch > "\x7f" and unicodedata.category(ch) in ("Cn", "Co", "Cs"))
        ):
            raise ValueError(
                f"is not text in {decoded.encoding}: it decodes to the character "
                f"U+{ord(ch):04X}, which no note contains; name the file's encoding "
                "with --encoding"
            )
    return decoded


def _decode(raw: bytes, encoding: str) -> Decoded:
    if encoding != AUTO:
        try:
            # --encoding utf-8 on a file with a BOM: the mark is no part of the note
            return Decoded(raw.decode(encoding).removeprefix("\ufeff"), encoding)
        except UnicodeDecodeError as err:
            raise ValueError(
                f"is not valid {encoding} text (byte 0x{raw[err.start]:02x} at "
                f"position {err.start}); check --encoding"
            ) from None
    for bom, name in _BOMS:
        if raw.startswith(bom):
            try:
                return Decoded(raw.decode(name), name)
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"starts with a {name} byte-order mark but is not valid {name} "
                    f"({err.reason} at byte {err.start})"
                ) from None
    try:
        return Decoded(raw.decode("utf-8"), "utf-8")
    except UnicodeDecodeError:
        pass
    utf16 = _utf16_without_bom(raw)
    if utf16 is not None:
        return Decoded(raw.decode(utf16), utf16, guessed=True)
    readings = {}
    for name in (_WESTERN, _CHINESE):
        try:
            readings[name] = raw.decode(name)
        except UnicodeDecodeError:
            continue
    plausible = [
        n
        for n, text in readings.items()
        if (_looks_chinese if n == _CHINESE else _looks_western)(text)
    ]
    if len(plausible) == 2:
        plausible = [_detector_choice(raw, plausible)]
    if len(plausible) == 1:
        return Decoded(readings[plausible[0]], plausible[0], guessed=True)
    raise ValueError(
        "is neither UTF-8 (with or without a BOM), UTF-16/32, nor recognisably "
        "Windows-1252 or GB18030 text; name its encoding with --encoding"
    )


def _utf16_without_bom(raw: bytes) -> str | None:
    """UTF-16 text of mostly ASCII characters has a zero byte in every other position."""
    if len(raw) < 4 or len(raw) % 2:
        return None
    even, odd = raw[0::2], raw[1::2]
    half = len(raw) // 2
    for zeros, other, name in ((odd, even, "utf-16-le"), (even, odd, "utf-16-be")):
        if zeros.count(0) >= 0.6 * half and other.count(0) == 0:
            try:
                raw.decode(name)
            except UnicodeDecodeError:
                return None
            return name
    return None


def _looks_western(text: str) -> bool:
    """Accented letters and symbols sit one or two at a time inside Latin words; Chinese read as
    Windows-1252 turns into long runs of them (two bytes per character)."""
    if any("\x80" <= ch <= "\x9f" for ch in text):  # C1 controls: not text
        return False
    runs = [len(r) for r in _NON_ASCII_RUN.findall(text)]
    return not runs or sum(runs) / len(runs) <= 2.0


def _looks_chinese(text: str) -> bool:
    """Chinese characters in runs, or most of the text: a Western accent read as GB18030 becomes
    one stray ideograph glued to a Latin word ('naïve' -> 'na飗e')."""
    cjk = len(_CJK_CHAR.findall(text))
    if cjk == 0:
        return False
    runs = [len(r) for r in _NON_ASCII_RUN.findall(text)]
    letters = sum(1 for ch in text if not ch.isspace())
    return sum(runs) / len(runs) >= 2.0 or cjk > 0.5 * letters


def _detector_choice(raw: bytes, names: list[str]) -> str:
    """charset-normalizer's pick between readings that both look plausible (short notes)."""
    best = from_bytes(raw, cp_isolation=names).best()
    if best is None:
        raise ValueError(f"could be {' or '.join(names)} text; name its encoding with --encoding")
    return codecs.lookup(best.encoding).name


PAD, UNK = "<pad>", "<unk>"
_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_PIECES = re.compile(rf"[{_CJK}]+|[^\W{_CJK}]+", re.UNICODE)
_IS_CJK = re.compile(rf"[{_CJK}]")


def tokenize(text: str, ngrams: int = 2) -> list[str]:
    """Lower-cased words and their n-grams up to ``ngrams`` (word pairs joined by a space, as
    scikit-learn's TfidfVectorizer makes them, across punctuation), and for Chinese, which has
    no spaces, characters and character n-grams up to ``ngrams + 1`` within a run of Chinese
    characters. ``ngrams=1`` is the first version's tokenizer: words, characters and character
    pairs (bundles trained with it keep it)."""
    tokens: list[str] = []
    words: list[str] = []
    for piece in _PIECES.findall(text.lower()):
        if _IS_CJK.match(piece):
            tokens.extend(piece)
            for n in range(2, ngrams + 2):
                tokens.extend(piece[i : i + n] for i in range(len(piece) - n + 1))
        else:
            tokens.append(piece)
            words.append(piece)
    for n in range(2, ngrams + 1):
        tokens.extend(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    return tokens


def fit_vocabulary(
    texts: Iterable[str | None], *, size: int, min_freq: int, ngrams: int = 2
) -> tuple[list[str], list[float]]:
    """The n-grams of at least ``min_freq`` training notes (document frequency; the most
    frequent first, ties alphabetical, so the result is deterministic; at most ``size``) and
    their smoothed inverse document frequency, as scikit-learn's TfidfVectorizer computes it.

    One streaming pass: ``texts`` may be a generator, and only the two counters (one entry per
    distinct token) are kept, never the tokens of all notes."""
    counts: Counter[str] = Counter()
    docs: Counter[str] = Counter()
    n_docs = 0
    for text in texts:
        if text:
            tokens = tokenize(text, ngrams)
            counts.update(tokens)
            docs.update(set(tokens))
            n_docs += 1
    ranked = sorted((t for t, c in docs.items() if c >= min_freq), key=lambda t: (-counts[t], t))
    vocab = [PAD, UNK, *ranked[: size - 2]]
    idf = [0.0, 1.0] + [math.log((1 + n_docs) / (1 + docs[t])) + 1.0 for t in vocab[2:]]
    return vocab, idf


def _note_ids(
    text: str | None, index: dict[str, int], max_length: int, ngrams: int, sublinear: bool
) -> tuple[list[int], list[float]]:
    """A note's distinct token ids (the most frequent n-grams first when more than
    ``max_length``) and their term frequencies: 1 + log(count) (sublinear), or 1 (binary)."""
    if not text:
        return [], []
    unk = index[UNK]
    if not sublinear:  # distinct tokens first: a note repeats many characters
        return sorted({index.get(t, unk) for t in set(tokenize(text, ngrams))})[:max_length], []
    counted = Counter(index.get(t, unk) for t in tokenize(text, ngrams))
    ids = sorted(counted)[:max_length]
    return ids, [1.0 + math.log(counted[i]) for i in ids]


def encode(
    text: str | None,
    index: dict[str, int],
    idf: list[float],
    max_length: int,
    *,
    ngrams: int = 2,
    sublinear: bool = True,
) -> tuple[list[int], list[float]]:
    """Distinct token ids of a note and their tf-idf weights (sublinear or binary term
    frequency), scaled to unit length, so long notes full of neutral sentences do not drown
    findings: the rows of scikit-learn's TfidfVectorizer(sublinear_tf=True)."""
    ids, tf = _note_ids(text, index, max_length, ngrams, sublinear)
    weights = [idf[i] * (tf[k] if tf else 1.0) for k, i in enumerate(ids)]
    norm = math.sqrt(sum(w * w for w in weights)) or 1.0
    return ids, [w / norm for w in weights]


NOTE_CHUNK = 65_536  # notes encoded and normalised together before they move to numpy


def encode_many(
    texts: Iterable[str | None],
    index: dict[str, int],
    idf: list[float],
    max_length: int,
    *,
    ngrams: int = 2,
    sublinear: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``encode`` for a whole cohort, stored flat: (ids int32, weights float32, offsets int64)
    with note i's ids at ``ids[offsets[i]:offsets[i + 1]]`` (an empty range without a note).
    The same numbers as ``encode`` note by note, at 4 + 4 bytes per token instead of two
    Python lists per patient. Notes are normalised a chunk at a time, so the float64 and
    index temporaries of the arithmetic never span the cohort (at a million notes they would
    add gigabytes to the peak)."""
    idf_array = np.asarray(idf, dtype=np.float64)
    id_parts: list[np.ndarray] = []
    weight_parts: list[np.ndarray] = []
    lengths: list[int] = []
    chunk: list[int] = []
    chunk_tf: list[float] = []
    chunk_lengths: list[int] = []

    def flush() -> None:
        ids = np.array(chunk, dtype=np.int32)
        weights = idf_array[ids]
        if sublinear:
            weights = weights * np.array(chunk_tf, dtype=np.float64)
        # Unit length per note; bincount adds each note's squares in order, like encode's sum.
        owner = np.repeat(np.arange(len(chunk_lengths)), chunk_lengths)
        norms = np.sqrt(np.bincount(owner, weights=weights * weights, minlength=len(chunk_lengths)))
        norms[norms == 0] = 1.0
        id_parts.append(ids)
        weight_parts.append((weights / norms[owner]).astype(np.float32))
        lengths.extend(chunk_lengths)
        chunk.clear()
        chunk_tf.clear()
        chunk_lengths.clear()

    for text in texts:
        ids, tf = _note_ids(text, index, max_length, ngrams, sublinear)
        chunk.extend(ids)
        chunk_tf.extend(tf)
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
