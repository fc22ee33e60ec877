"""Regenerates the ingest test files beside it, byte for byte the same each time.

    python tests/data/ingest/make_ingest_data.py


corpus/     one small dataset in every format, nested, with a `_SUCCESS` marker to skip
encodings/  the same kind of text stored as GB18030, UTF-16 (with and without a BOM), Latin-1
bad/        what the reader must count, not crash on: binary, NUL bytes, bad JSON lines,
            bombs, truncated streams, a CSV without the text column, a Parquet int column
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

HERE = Path(__file__).resolve().parent
FORTUNES = [t.strip("\n") for t in (HERE.parent / "fortunes-sample.txt").read_text().split("\n%\n")]
CHINESE = [
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。",
    "深度学习使用多层神经网络来提取特征，今天我们讨论训练数据的准备。",
    "数据准备需要处理各种编码，例如国标编码和统一码，还要去掉重复的文档。",
    "用户的工单、维基页面和聊天记录往往混合了中文和英文。",
    "模型在本地训练，数据不出门，这是私有部署的意义所在。",
]


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


def jsonl(records: list[dict[str, object]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def write(path: str, data: bytes) -> None:
    target = HERE / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def parquet(table: pa.Table, row_group_size: int) -> bytes:
    out = io.BytesIO()
    pq.write_table(table, out, row_group_size=row_group_size)
    return out.getvalue()


def csv_bytes(rows: list[list[str]], delimiter: str) -> bytes:
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter, lineterminator="\n").writerows(rows)
    return out.getvalue().encode()


def corpus() -> None:
    write("corpus/fortunes.txt", ("\n%\n".join(FORTUNES[:12]) + "\n").encode())
    write("corpus/notes.txt.zst", zst(("\n\n".join(FORTUNES[12:17]) + "\n").encode()))
    write("corpus/2024/part-0000.jsonl.gz", gz(jsonl([
        {"id": f"ticket-{i}", "text": FORTUNES[20 + i], "team": "support", "priority": i % 3,
         "tags": ["export", "2024"]} for i in range(10)])))
    write("corpus/2024/part-0001.jsonl.zst", zst(jsonl([
        {"text": CHINESE[i % 5] + f"（第{i}条）", "lang": "zh"} for i in range(10)])))
    write("corpus/tickets.csv", csv_bytes(
        [["id", "title", "text", "priority"],
         ["T-1", "Login fails", "User cannot log in, says \"invalid token\".", "high"],
         ["T-2", "Export", "The export has two lines:\nline one, then\nline two.", "low"],
         ["T-3", "中文工单", CHINESE[3], "medium"],
         ["T-4", "Empty title", FORTUNES[40], ""],
         ["T-5", "Commas, quotes", 'a, "quoted", b', "low"]], ","))
    write("corpus/tickets.tsv", csv_bytes(
        [["id", "text", "team"]] + [[f"W-{i}", FORTUNES[50 + i], "wiki"] for i in range(4)],
        "\t"))
    table = pa.table({
        "id": [f"page-{i:03d}" for i in range(30)],
        "text": [CHINESE[i % 5] if i % 3 == 0 else FORTUNES[60 + i] for i in range(30)],
        "lang": ["zh" if i % 3 == 0 else "en" for i in range(30)],
        "views": pa.array(range(1000, 1030), pa.int64()),
    })
    write("corpus/wiki.parquet", parquet(table, 10))
    write("corpus/archive/wiki-old.parquet.gz", gz(parquet(table.slice(0, 6), 3)))
    write("corpus/_SUCCESS", b"")


def encodings() -> None:
    zh = "\n%\n".join(CHINESE) + "\n"
    write("encodings/zh-gb18030.txt", zh.encode("gb18030"))
    write("encodings/zh-utf16-bom.txt", zh.encode("utf-16"))
    write("encodings/en-utf16le.jsonl", jsonl([{"text": t} for t in FORTUNES[:8]])
          .decode().encode("utf-16-le"))
    latin = "\n%\n".join(["Café déjà vu, naïve façade, señor, Müller; über alles."] * 40)
    write("encodings/latin1.txt", latin.encode("latin-1"))


def bad() -> None:
    write("bad/blob.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 40)
    write("bad/nul-records.jsonl", b'{"text": "clean one"}\n'
          + b'{"text": "raw \x00 nul"}\n'
          + b'{"text": "escaped \\u0000 nul"}\n'
          + b'{"text": "clean two"}\n')
    write("bad/mixed-bad.jsonl", b'{"text": "good one", "id": 7}\n'
          + b'{"text": "bad \xff utf8"}\n'
          + b"not json\n"
          + b'{"other": 1, "id": "no-text"}\n'
          + b"[1, 2]\n"
          + b'{"text": "' + b"x" * 3000 + b'"}\n'
          + b'{"text": "good two"}\n')
    line = json.dumps({"text": "all work and no play makes a dull corpus " * 4}).encode() + b"\n"
    bomb = line * ((8 << 20) // len(line))
    write("bad/bomb.jsonl.gz", gz(bomb))
    write("bad/bomb.jsonl.zst", zst(bomb))
    good = jsonl([{"text": t} for t in FORTUNES[:400]])
    write("bad/truncated.jsonl.gz", gz(good)[:-400])
    write("bad/truncated.jsonl.zst", zst(good)[:-400])
    write("bad/no-text-column.csv", csv_bytes([["id", "body"], ["1", "hello"]], ","))
    write("bad/int-text.parquet", parquet(pa.table({"text": pa.array([1, 2, 3], pa.int64())}), 3))


if __name__ == "__main__":
    corpus()
    encodings()
    bad()
