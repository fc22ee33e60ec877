"""A planted near-duplicate corpus built from real texts packaged in Debian.

    python -m benchmarks.dataprep.corpus --out /tmp/lmforge-bench/corpus [--docs 100000]
        [--pairs 6000] [--zh-share 0.25] [--seed 0]

Sources, fetched with `apt-get download` and unpacked with `dpkg -x` into the
output directory (no root needed, nothing installed):

- English: the fortune cookies of `fortunes`, `fortunes-min`,
  `fortunes-bofh-excuses` and `fortune-anarchism`; the paragraphs of the
  Linux man pages (`manpages`); the entries of four dictd dictionaries
  (`dict-gcide` — Webster's 1913 and later —, `dict-foldoc`, `dict-jargon`,
  `dict-devil`);
- Portuguese: `fortunes-mario` (ASCII art left out);
- Chinese: `fortunes-zh` (Tang and Song poems, sayings) and the paragraphs of
  the Chinese man pages (`manpages-zh`, simplified and traditional).

Where apt cannot fetch them (no Debian, no network) the corpus is built from
the shipped `tests/data/fortunes-sample.txt` alone, far below 100k documents,
and `meta.json` says so (`"fallback": true`).

Planting: a base document (>= 40 words, or >= 40 CJK characters) gets one
variant made by random edits — words (characters for Chinese) substituted,
deleted, inserted, cut from either end — plus cosmetic changes (case,
punctuation, line breaks) that leave the shingles alone. The number of edits
is searched (bisection over one random edit sequence) so the TRUE Jaccard of
the two shingle sets (`services.data_prep.near_dup.shingle_set`, the
definition the stage hashes) lands near a target drawn uniformly from
[0.5, 1.0), with 5% of pairs cosmetic only (J = 1.0); the measured value is
recorded per pair and the bands are cut on it.

Output: `corpus.jsonl` (id, text, source, lang; shuffled; ids opaque),
`pairs.jsonl` (a, b, jaccard, lang, edits) and `meta.json` (sources and their
counts, planted pairs per band and language, the parameters). Reused when
`meta.json` shows the same parameters.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from services.data_prep.near_dup import jaccard, shingle_set

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["fortunes", "fortunes-min", "fortunes-bofh-excuses", "fortune-anarchism",
            "fortunes-mario", "fortunes-zh", "manpages", "manpages-zh", "dict-gcide",
            "dict-foldoc", "dict-jargon", "dict-devil"]
BANDS = [(0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.0001)]
FORMAT = "lmforge-near-dup-corpus/1"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_ROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),   # font changes
    (re.compile(r"\\s[+-]?\d"), ""),               # size changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),  # strings
    (re.compile(r"\\\((em|en)"), "-"),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),      # other special characters
    (re.compile(r"\\[-e]"), "-"),
    (re.compile(r"\\[&%c/,~ |^:]"), ""),
]
_ROFF_BREAK = {".PP", ".P", ".LP", ".TP", ".IP", ".HP", ".SH", ".SS", ".TH", ".RS", ".RE",
               ".nf", ".fi", ".EX", ".EE", ".in", ".sp", ".TQ", ".UR", ".UE"}
_ROFF_FONT = {".B", ".I", ".BR", ".IR", ".RB", ".BI", ".IB", ".RI", ".SM", ".SB"}


@dataclass(slots=True)
class SourceDoc:
    text: str
    source: str
    lang: str


# ---------------------------------------------------------------- fetching the texts

def fetch_debian_texts(work: Path) -> Path | None:
    """Download and unpack the packages under work/root; None where apt cannot."""
    root = work / "root"
    if (root / "usr/share").is_dir():
        return root
    debs = work / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs, check=True,
                       capture_output=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"corpus: apt-get download failed ({e}); falling back to tests/data",
              file=sys.stderr)
        return None
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True, timeout=600)
    return root


def _fortune_records(path: Path) -> Iterator[str]:
    text = _ANSI.sub("", path.read_text(encoding="utf-8", errors="replace"))
    for record in re.split(r"^%\s*$", text, flags=re.M):
        record = record.strip()
        if record:
            yield record


def _clean_roff(line: str) -> str:
    for pattern, repl in _ROFF_ESCAPES:
        line = pattern.sub(repl, line)
    return line.replace("\\\\", "\\").replace('"', "").strip()


def _man_paragraphs(path: Path) -> Iterator[str]:
    try:
        raw = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
    except (OSError, EOFError):
        return
    para: list[str] = []
    for line in raw.splitlines():
        if line.startswith((".\\\"", "'\\\"", '.\\"')):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line.partition(" ")
            if macro in _ROFF_FONT:
                para.append(_clean_roff(rest))
            elif macro in _ROFF_BREAK or macro == ".so":
                if para:
                    yield " ".join(p for p in para if p)
                para = []
            continue
        if not line.strip():
            if para:
                yield " ".join(p for p in para if p)
            para = []
            continue
        para.append(_clean_roff(line))
    if para:
        yield " ".join(p for p in para if p)


def _dict_entries(dict_path: Path, index_path: Path) -> Iterator[str]:
    data = gzip.decompress(dict_path.read_bytes())
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def b64(s: str) -> int:
        n = 0
        for ch in s:
            n = n * 64 + alphabet.index(ch)
        return n

    seen: set[int] = set()
    for line in index_path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") \
                or parts[0].startswith("00database"):
            continue
        offset, length = b64(parts[1]), b64(parts[2])
        if offset in seen:
            continue
        seen.add(offset)
        yield data[offset:offset + length].decode("utf-8", errors="replace").strip()


def read_sources(root: Path | None) -> list[SourceDoc]:
    """Every usable document of the sources, exact duplicates removed."""
    docs: list[SourceDoc] = []
    if root is None:
        sample = ROOT / "tests/data/fortunes-sample.txt"
        docs = [SourceDoc(t, "tests/data/fortunes-sample.txt", "en")
                for t in _fortune_records(sample)]
    else:
        share = root / "usr/share"
        for path in sorted((share / "games/fortunes").iterdir()):
            if path.suffix in (".dat", ".u8") or path.is_symlink() or not path.is_file():
                continue
            if path.name in ("ascii-art", "mario.arteascii", "art"):
                continue
            lang = ("zh" if path.name in ("chinese", "tang300", "song100")
                    else "pt" if path.name.startswith("mario.") else "en")
            docs += [SourceDoc(t, f"fortunes/{path.name}", lang) for t in _fortune_records(path)]
        for section in sorted((share / "man").glob("man[1-8]")):
            for page in sorted(section.glob("*.gz")):
                docs += [SourceDoc(t, f"man/{section.name}", "en") for t in _man_paragraphs(page)]
        for loc in ("zh_CN", "zh_TW"):
            for page in sorted((share / "man" / loc).glob("man*/*.gz")):
                docs += [SourceDoc(t, f"man/{loc}", "zh") for t in _man_paragraphs(page)]
        for name in ("gcide", "foldoc", "jargon", "devil"):
            d = share / "dictd"
            if (d / f"{name}.index").is_file():
                docs += [SourceDoc(t, f"dict/{name}", "en")
                         for t in _dict_entries(d / f"{name}.dict.dz", d / f"{name}.index")]
    out: list[SourceDoc] = []
    seen: set[str] = set()
    for doc in docs:
        text = re.sub(r"\n{3,}", "\n\n", doc.text).strip()
        size = len(_CJK.findall(text)) if doc.lang == "zh" else len(text.split())
        if size < (8 if doc.lang == "zh" else 4) or text in seen:
            continue
        seen.add(text)
        out.append(SourceDoc(text, doc.source, doc.lang))
    return out


# ---------------------------------------------------------------- planting

@dataclass(slots=True)
class PlantedPair:
    a: str
    b: str
    jaccard: float
    lang: str
    edits: int


def _units(text: str, lang: str) -> list[str]:
    return list(text) if lang == "zh" else text.split()


def _join(units: list[str], lang: str) -> str:
    return "".join(units) if lang == "zh" else " ".join(units)


def _apply_edits(units: list[str], ops: list[tuple[str, float, str]]) -> list[str]:
    out = list(units)
    for kind, where, unit in ops:
        if not out:
            break
        i = min(int(where * len(out)), len(out) - 1)
        if kind == "sub":
            out[i] = unit
        elif kind == "del":
            del out[i]
        elif kind == "ins":
            out.insert(i, unit)
        elif kind == "tail":
            out.pop()
        elif kind == "head":
            out.pop(0)
    return out


def _cosmetic(text: str, lang: str, rng: random.Random) -> str:
    """Changes that leave the shingles alone: case, punctuation, line breaks."""
    if lang == "zh":
        return text.replace("，", ", ", rng.randrange(3)).replace("。", "。\n", 1)
    words = text.split(" ")
    for _ in range(rng.randrange(1, 4)):
        i = rng.randrange(len(words))
        words[i] = words[i].upper() if rng.random() < 0.5 else words[i].capitalize()
    out = " ".join(words)
    return out.replace(",", ";", 1).replace(". ", ".\n", 1) + rng.choice(["", "!", " --"])


def plant_variant(base: str, lang: str, target: float, vocabulary: list[str],
                  rng: random.Random, shingles: Callable[[str], set[str]]
                  ) -> tuple[str, float, int] | None:
    """A variant of `base` whose shingle Jaccard with it is near `target` (None: not reachable)."""
    units = _units(base, lang)
    base_set = shingles(base)
    if target >= 1.0:
        variant = _cosmetic(base, lang, rng)
        return variant, jaccard(base_set, shingles(variant)), 0
    kinds = ["sub"] * 5 + ["del"] * 2 + ["ins"] * 2 + ["tail", "head"]
    ops = [(rng.choice(kinds), rng.random(), rng.choice(vocabulary))
           for _ in range(len(units))]

    def measure(k: int) -> tuple[float, list[str]]:
        edited = _apply_edits(units, ops[:k])
        return jaccard(base_set, shingles(_join(edited, lang))), edited

    lo, hi = 0, len(ops)
    j_hi, _ = measure(hi)
    if j_hi >= target:
        return None
    while hi - lo > 1:  # J(lo) >= target > J(hi)
        mid = (lo + hi) // 2
        if measure(mid)[0] >= target:
            lo = mid
        else:
            hi = mid
    j_lo, edited_lo = measure(lo)
    j_hi, edited_hi = measure(hi)
    k, j, edited = ((lo, j_lo, edited_lo) if abs(j_lo - target) <= abs(j_hi - target)
                    else (hi, j_hi, edited_hi))
    if k == 0 or j < 0.5:
        return None
    variant = _join(edited, lang)
    if rng.random() < 0.5:
        variant = _cosmetic(variant, lang, rng)
    final = jaccard(base_set, shingles(variant))
    return (variant, final, k) if final >= 0.5 else None


def _band(j: float) -> str:
    for lo, hi in BANDS:
        if lo <= j < hi:
            return f"{lo:.1f}-{min(hi, 1.0):.1f}"
    return "below-0.5"


@dataclass(slots=True)
class CorpusMeta:
    format: str
    docs: int
    pairs: int
    zh_share: float
    seed: int
    word_ngram: int
    cjk_ngram: int
    docs_written: int
    pairs_planted: int
    fallback: bool
    sources: dict[str, int]
    langs: dict[str, int]
    planted_per_band: dict[str, dict[str, int]]


def build_corpus(out: Path, *, docs: int = 100_000, pairs: int = 6000, zh_share: float = 0.25,
                 seed: int = 0, word_ngram: int = 5, cjk_ngram: int = 5) -> CorpusMeta:
    """Write corpus.jsonl, pairs.jsonl and meta.json under `out` (reused when they match)."""
    params = {"format": FORMAT, "docs": docs, "pairs": pairs, "zh_share": zh_share, "seed": seed,
              "word_ngram": word_ngram, "cjk_ngram": cjk_ngram}
    meta_path = out / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if all(old.get(k) == v for k, v in params.items()):
            return CorpusMeta(**old)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    root = fetch_debian_texts(out / "debian")
    pool = read_sources(root)
    rng.shuffle(pool)

    def shingles(text: str) -> set[str]:
        return shingle_set(text, word_ngram=word_ngram, cjk_ngram=cjk_ngram)

    vocab = {"zh": [c for d in pool if d.lang == "zh" for c in _CJK.findall(d.text)],
             "en": [w for d in pool[:20000] if d.lang == "en" for w in d.text.split()]}
    n_pairs = min(pairs, docs // 2)
    n_base = docs - n_pairs
    # All Chinese documents where they fit (they are the scarcer), then the rest.
    zh = [d for d in pool if d.lang == "zh"]
    other = [d for d in pool if d.lang != "zh"]
    chosen = (zh[:n_base // 3] + other)[:n_base]
    rng.shuffle(chosen)

    def eligible(d: SourceDoc) -> bool:
        if d.lang == "zh":
            return len(_CJK.findall(d.text)) >= 40
        return d.lang == "en" and len(d.text.split()) >= 40

    candidates = {"zh": [i for i, d in enumerate(chosen) if d.lang == "zh" and eligible(d)],
                  "en": [i for i, d in enumerate(chosen) if d.lang == "en" and eligible(d)]}
    want = {"zh": round(n_pairs * zh_share), "en": n_pairs - round(n_pairs * zh_share)}
    records: list[dict[str, str]] = [
        {"text": d.text, "source": d.source, "lang": d.lang} for d in chosen]
    planted: list[tuple[int, int, float, str, int]] = []
    for lang in ("zh", "en"):
        if not vocab[lang]:
            continue
        made = 0
        for i in candidates[lang]:
            if made >= want[lang]:
                break
            target = 1.0 if rng.random() < 0.05 else rng.uniform(0.5, 1.0)
            result = plant_variant(chosen[i].text, lang, target, vocab[lang], rng, shingles)
            if result is None:
                continue
            variant, j, edits = result
            records.append({"text": variant, "source": chosen[i].source + " (planted)",
                            "lang": lang})
            planted.append((i, len(records) - 1, j, lang, edits))
            made += 1
    order = list(range(len(records)))
    rng.shuffle(order)
    new_id = {old: f"doc-{pos:06d}" for pos, old in enumerate(order)}
    with (out / "corpus.jsonl").open("w", encoding="utf-8") as f:
        for old in order:
            f.write(json.dumps({"id": new_id[old], **records[old]}, ensure_ascii=False) + "\n")
    per_band: dict[str, Counter[str]] = {}
    with (out / "pairs.jsonl").open("w", encoding="utf-8") as f:
        for a, b, j, lang, edits in planted:
            pair = PlantedPair(new_id[a], new_id[b], round(j, 6), lang, edits)
            f.write(json.dumps(asdict(pair)) + "\n")
            per_band.setdefault(_band(j), Counter())[lang] += 1
    meta = CorpusMeta(
        format=FORMAT, docs=docs, pairs=pairs, zh_share=zh_share, seed=seed,
        word_ngram=word_ngram, cjk_ngram=cjk_ngram, docs_written=len(records),
        pairs_planted=len(planted), fallback=root is None,
        sources=dict(Counter(r["source"].split(" ")[0].split("/")[0] + "/"
                             + r["source"].split(" ")[0].split("/")[-1] for r in records)),
        langs=dict(Counter(r["lang"] for r in records)),
        planted_per_band={k: dict(v) for k, v in sorted(per_band.items())})
    meta_path.write_text(json.dumps(asdict(meta), indent=1, ensure_ascii=False))
    return meta


def load_corpus(out: Path) -> tuple[list[dict[str, str]], list[dict[str, object]]]:
    """The documents and the planted pairs written by `build_corpus`."""
    with (out / "corpus.jsonl").open(encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    with (out / "pairs.jsonl").open(encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f]
    return docs, pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/lmforge-bench/near-dup-corpus"))
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--pairs", type=int, default=6000)
    parser.add_argument("--zh-share", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build_corpus(args.out, docs=args.docs, pairs=args.pairs, zh_share=args.zh_share,
                 seed=args.seed)
    print((args.out / "meta.json").read_text())


if __name__ == "__main__":
    main()
