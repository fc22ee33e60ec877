"""Writes challenge.jsonl: hand-written PII cases in formats the templated set lacks.

    python tests/data/pii/make_challenge.py   # rewrites tests/data/pii/challenge.jsonl

Written after the detector, as a check it was not tuned on: extensions,
national formats without a country code, credentials in URLs and JSON, IPv6
zone ids, lower-case IBANs, SSNs without separators, Chinese IDs ending in x,
and prose that quotes numbers. Same line format as labelled.jsonl. Markup in
the sources below: ⟦TYPE|value⟧ is PII, ⟪kind|value⟫ a near-miss.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("challenge.jsonl")
_MARK = re.compile(r"⟦([A-Z]+)\|(.*?)⟧|⟪([a-z_]+)\|(.*?)⟫", re.DOTALL)

SOURCES = [
    "Reach me on ⟦PHONE|+1 212-555-0187⟧ ext. 204, or my cell ⟦PHONE|(646) 555-0143⟧.",
    "UK office: ⟦PHONE|020 7946 0958⟧; mobile ⟦PHONE|07700 900461⟧.",
    "東京オフィスの電話番号は⟦PHONE|03-1234-5678⟧です。",
    "有事打我电话⟦PHONE|186-1234-5678⟧，或者微信同号。",
    "座机：⟦PHONE|(010)8888 6666⟧，分机 123。",
    "Phone: ⟦PHONE|+86 (10) 6552 9988⟧",
    "Contact: ⟦PHONE|+49 176 12345678⟧ (WhatsApp)",
    "My number changed from ⟦PHONE|415-555-0111⟧ to ⟦PHONE|415-555-0199⟧.",
    "DATABASE_URL=postgres://admin:⟦SECRET|Pg8x!vT29qLm⟧@⟦IP|10.2.3.4⟧:5432/app",
    '{"access_token": "⟦SECRET|ya29.a0AfH6SMBx8d3kq1ZxQ7vP0mN2rT5uW8yB4cE6gH9jK1lO3pR⟧", '
    '"expires_in": 3599}',
    "api_key: ⟦SECRET|a8f5f167f44f4964e6c998dee827110c⟧",
    "X-Api-Key: ⟦SECRET|9d2f7c1ab34e4f0e8a6b5c3d2e1f0a9b⟧",
    "ssh into ⟦IP|fe80::1ff:fe23:4567:890a%eth0⟧ from the jump host",
    "Blocked range ⟦IP|198.51.100.0⟧/24 and single host ⟦IP|192.0.2.77⟧.",
    "Ping ⟦IP|2001:db8::ff00:42:8329⟧ and ⟦IP|::1⟧ to test the loopback.",
    "The address is ⟦IP|10.0.0.1⟧.",
    "IBAN in lower case: ⟦IBAN|de89 3704 0044 0532 0130 00⟧",
    "Bankverbindung: ⟦IBAN|DE89370400440532013000⟧, BIC COBADEFFXXX",
    "Please pay to ⟦IBAN|GB82 WEST 1234 5698 7654 32⟧ by Friday.",
    "SSN: ⟦ID|078051121⟧ (no dashes)",
    "身份证号码⟦ID|11010519491231002x⟧（末位小写）",
    "申请人身份证：⟦ID|440524188001010014⟧",
    "Card on file: ⟦CARD|378282246310005⟧ (Amex)",
    "Card: ⟦CARD|6011 1111 1111 1117⟧ exp 09/27 CVV 123",
    "银联卡号⟦CARD|6212 2602 0000 0000 006⟧",
    "Test Visa ⟦CARD|4111-1111-1111-1111⟧ declined.",
    "Email me: ⟦EMAIL|first.last@sub.example.co.uk⟧ or ⟦EMAIL|x+y@ex-ample.com⟧.",
    "邮箱⟦EMAIL|wang.wei_88@163.com⟧联系",
    "mailto:⟦EMAIL|info@example.museum⟧",
    "-----BEGIN OPENSSH PRIVATE KEY-----⟪nothing|⟫ is how the file starts; the key itself "
    "was rotated.",
    "token ghp_ is the prefix of ⟪prose|GitHub⟫ tokens, e.g. ⟦SECRET|"
    "ghp_R8x2Lq9ZtY4mN7vB1cD3eF5gH6jK0pQsWuVx⟧.",
    "Authorization: Basic ⟦SECRET|YWxhZGRpbjpvcGVuc2VzYW1lMTIz⟧",
    "AWS key ⟦SECRET|AKIAIOSFODNN7EXAMPLE⟧ is the documented example.",
    "Released ⟪version|2.4.1.0⟫ today; see ⟪version|v3.0.0.12⟫ for the next one.",
    "Python ⟪version|3.11.4⟫ and numpy ⟪version|2.0.0⟫.",
    "Firmware ⟪version|1.0.4.22⟫ fixes the Wi-Fi drop.",
    "Windows ⟪version|10.0.19045.3570⟫",
    "在⟪date|2023.10.15⟫发布了⟪version|4.2.0.1⟫版。",
    "订单⟪order_number|13812345678⟫已取消。",
    "Order no. ⟪order_number|4111111111111111⟫ (yes, it looks like a card).",
    "Invoice ⟪invoice_number|2024-000123⟫ for ⟪amount|1,234.56⟫ EUR.",
    "Tracking: ⟪tracking_number|1Z999AA10123456784⟫",
    "Date of birth ⟪date|1990-03-07⟫, registered ⟪date|07/03/2015⟫.",
    "Timestamp ⟪timestamp|1700000000123⟫ ms since the epoch.",
    "Room ⟪room|1203⟫, building ⟪building|5⟫, floor ⟪floor|12⟫.",
    "Population of Beijing: ⟪amount|21,893,095⟫.",
    "The constant ⟪number|6.02214076⟫ × 10^23.",
    "Phone numbers look like ⟪placeholder|XXX-XXX-XXXX⟫ in our form.",
    "Use ⟪placeholder|<your-email>⟫ and ⟪placeholder|api_key=<KEY>⟫ in the config.",
    "⟪hash|d41d8cd98f00b204e9800998ecf8427e⟫ is the MD5 of the empty string.",
    "sha256: ⟪hash|e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855⟫",
    "商品编码⟪product_code|6901234567892⟫（条形码）",
    "学号⟪student_number|2021010123⟫，班级3班。",
    "工单号⟪ticket_number|202310150001⟫，优先级高。",
    "The ISBN-13 ⟪isbn|9780306406157⟫ is valid.",
    "IPv4 has ⟪number|4,294,967,296⟫ addresses; 256.1.1.1 is not one of them.",
    "Score: ⟪score|3.5.2.1⟫ (rounds won per set).",
    "Coordinates ⟪coordinates|31.2304° N, 121.4737° E⟫",
    "Call us at ⟦PHONE|1-800-555-0199⟧, toll-free.",
    "手机号码：⟦PHONE|+86 186 0000 1234⟧，备用⟦PHONE|15912345678⟧。",
    "Server logs show ⟦IP|203.0.113.9⟧ hitting /admin at ⟪time|03:12:44⟫.",
    "pwd=⟦SECRET|Tr0ub4dor&3⟧",
    "password: ⟪placeholder|********⟫",
    "The meeting is at ⟪time|10:30⟫ in room ⟪room|4.12⟫.",
]


def parse(source: str) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    text = ""
    spans: list[dict[str, Any]] = []
    near: list[dict[str, Any]] = []
    last = 0
    for m in _MARK.finditer(source):
        text += source[last:m.start()]
        start = len(text)
        if m.group(1):
            text += m.group(2)
            spans.append({"start": start, "end": len(text), "type": m.group(1),
                          "kind": m.group(1).lower()})
        else:
            text += m.group(4)
            if m.group(4):
                near.append({"start": start, "end": len(text), "kind": m.group(3)})
        last = m.end()
    return text + source[last:], spans, near


def main() -> None:
    with OUT.open("w", encoding="utf-8") as f:
        for i, source in enumerate(SOURCES):
            text, spans, near = parse(source)
            lang = "zh" if re.search("[\u3040-\u30ff\u4e00-\u9fff]", text) else "en"
            f.write(json.dumps({"id": f"challenge-{i:03d}", "lang": lang, "text": text,
                                "spans": spans, "near_misses": near}, ensure_ascii=False) + "\n")
    print(f"{len(SOURCES)} documents -> {OUT}")


if __name__ == "__main__":
    main()
