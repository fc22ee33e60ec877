from __future__ import annotations

import json
from collections import Counter

import pytest

from services.data_prep.documents import DecisionLog, Document
from services.data_prep.pii import (
    PII_TYPES,
    PiiConfig,
    PiiScrubber,
    cn_resident_id_ok,
    find_pii,
    iban_ok,
    luhn_ok,
    scrub_pii,
)
from tests.conftest import TEST_DATA

PEM = ("-----BEGIN RSA PRIVATE KEY-----\n"
       "MIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MhgHcTz6sE2I2yPB\n"
       "aFDrBz9vFqU4yVLi0cJQjv1DxrY3ePqtvXWQzBk3dEN1Z2jUq5GQ0rWmAqfHZq7p\n"
       "-----END RSA PRIVATE KEY-----")
JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ."
       "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")

# (text, the PII value in it, its type)
FOUND = [
    ("Contact me at jane.doe+news@example.co.uk today.", "jane.doe+news@example.co.uk", "EMAIL"),
    ("请发邮件到zhangsan@163.com联系", "zhangsan@163.com", "EMAIL"),
    ("Call +1 (415) 555-0132 after five.", "+1 (415) 555-0132", "PHONE"),
    ("Office: +44 20 7946 0958.", "+44 20 7946 0958", "PHONE"),
    ("手机号是13800138000，请回电。", "13800138000", "PHONE"),
    ("手机：138-0013-8000", "138-0013-8000", "PHONE"),
    ("电话 +86 139 1234 5678", "+86 139 1234 5678", "PHONE"),
    ("座机010-62345678转分机", "010-62345678", "PHONE"),
    ("cell (646) 555-0143", "(646) 555-0143", "PHONE"),
    ("東京オフィスは03-1234-5678です", "03-1234-5678", "PHONE"),
    ("Failed password for root from 203.0.113.45 port 22", "203.0.113.45", "IP"),
    ("服务器地址192.168.1.10，请勿外传", "192.168.1.10", "IP"),
    ("listen on 2001:db8:85a3::8a2e:370:7334 now", "2001:db8:85a3::8a2e:370:7334", "IP"),
    ("curl http://[::1]:8080/health", "::1", "IP"),
    ("Card 4111 1111 1111 1111 exp 12/27", "4111 1111 1111 1111", "CARD"),
    ("Amex 3782-822463-10005 on file", "3782-822463-10005", "CARD"),
    ("银联卡号6212260200000000006", "6212260200000000006", "CARD"),
    ("IBAN DE89 3704 0044 0532 0130 00, BIC COBADEFFXXX", "DE89 3704 0044 0532 0130 00", "IBAN"),
    ("汇款至GB82WEST12345698765432。", "GB82WEST12345698765432", "IBAN"),
    ("身份证号码：11010519491231002X，", "11010519491231002X", "ID"),
    ("SSN 123-45-6789 on the W-9", "123-45-6789", "ID"),
    ("SSN: 078051121", "078051121", "ID"),
    ("export AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE", "SECRET"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
     "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "SECRET"),
    (f"key:\n{PEM}\nthanks", PEM, "SECRET"),
    (f"Authorization: Bearer {JWT}", JWT, "SECRET"),
    ("STRIPE_API_KEY = \"sk_live_4eC39HqLyjWDarjtT1zdp7dc\"", "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
     "SECRET"),
    ("api_key: a8f5f167f44f4964e6c998dee827110c", "a8f5f167f44f4964e6c998dee827110c", "SECRET"),
    ("DATABASE_URL=postgres://app:Pg8x7vT29qLm@db:5432/app", "Pg8x7vT29qLm", "SECRET"),
]


@pytest.mark.parametrize(("text", "value", "type_"), FOUND,
                         ids=[f"{t}-{i}" for i, (_, _, t) in enumerate(FOUND)])
def test_each_pii_type_is_found_with_its_exact_span(text, value, type_):
    spans = [(text[s.start:s.end], s.type) for s in find_pii(text)]
    assert (value, type_) in spans, spans


def test_every_type_has_a_case():
    assert {t for _, _, t in FOUND} == set(PII_TYPES)


# (text, what it is) -- nothing in these is PII
NEAR_MISSES = [
    ("Your order #4532015112830366 ships tomorrow.", "order number that passes Luhn"),
    ("订单号：13812345678已取消", "order number shaped like a mobile"),
    ("Invoice INV-2023-004512 dated 2023-11-05.", "invoice number, date"),
    ("Invoice No. 88231904 is attached.", "invoice number"),
    ("Meeting at 14:30:15 on 2024/03/07.", "time and date"),
    ("2023年11月5日 10:30 在会议室", "Chinese date and time"),
    ("Upgrade to version 1.2.3.4 before Friday.", "version after 'version'"),
    ("Download v2.10.0.1 from the release page.", "v-prefixed version"),
    ("User agent Chrome/120.0.6099.129 Safari/537.36", "browser version"),
    ("请升级到3.1.4.1版本后重试。", "version before 版本"),
    ("See section 4.2.1.3 and OID 1.3.6.1.4.1.311.", "section number, OID"),
    ("The test number 4532 1234 5678 9011 fails Luhn.", "Luhn-failing 16 digits"),
    ("参考编号110105194912310021校验失败。", "18 digits with a wrong check digit"),
    ("SSN field holds 666-12-3456, 000-12-3456 and 123-00-4567.", "never-issued SSNs"),
    ("Pay DE12 3456 7890 1234 5678 90 (bad checksum).", "IBAN failing mod-97"),
    ("MAC 00:1A:2B:3C:4D:5E is allowed.", "MAC address"),
    ("Commit 3f2a9c1d8e7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f fixes it.", "git SHA"),
    ("npm i lodash@4.17.21 and use icon@2x.png", "package@version, retina file"),
    ("Set api_key=YOUR_API_KEY and Authorization: Bearer $TOKEN.", "placeholders"),
    ("Give it to the bearer of this letter; the token expired.", "the word bearer"),
    ("-----BEGIN CERTIFICATE-----\nMIIDdzCCAl+gAwIBAgIEAgAAuTANBgkqhkiG9w0BAQUFADBa\n"
     "-----END CERTIFICATE-----", "a public certificate"),
    ("ISBN 978-3-16-148410-0, EAN 6901234567892", "ISBN, EAN barcode"),
    ("Amount due: $1,234,567.89, ¥13,800,138.00", "amounts"),
    ("std::vector<int> and Foo::Bar::baz()", "C++ scopes"),
    ("UUID 550e8400-e29b-41d4-a716-446655440000 not found", "UUID"),
    ("坐标 39.9042, 116.4074，邮编100084", "coordinates, postcode"),
    ("Failed password for root from port 22", "the word password in a log"),
    ("Final score: 6.4.3.6 after four sets.", "a score shaped like an address"),
    ("比分 3.5.2.1，主队领先", "a Chinese score shaped like an address"),
]


@pytest.mark.parametrize(("text", "what"), NEAR_MISSES, ids=[w for _, w in NEAR_MISSES])
def test_near_misses_are_not_pii(text, what):
    assert find_pii(text) == [], [text[s.start:s.end] for s in find_pii(text)]


def test_a_dotted_quad_is_an_address_unless_its_context_says_version():
    assert [s.type for s in find_pii("connect to 10.1.2.3 now")] == ["IP"]
    assert find_pii("connect to version 10.1.2.3 now") == []
    # The nearest keyword decides: "server" comes after "upgrade" here.
    assert [s.type for s in find_pii("after the upgrade the server at 10.0.0.5 failed")] == ["IP"]
    # Score words are whole words: a scoreboard host is still an address.
    assert [s.type for s in find_pii("the scoreboard runs on 10.0.0.5")] == ["IP"]


def test_scrubbing_replaces_only_the_spans_and_keeps_the_text_around_them():
    text = ("Hi, I'm Wei (wei.chen@acme.io, 手机13912345678). Order #20231105 from "
            "192.168.0.7 with version 1.2.3.4.\n  Thanks!  ")
    scrubbed, counts = scrub_pii(text, PiiConfig())
    assert scrubbed == ("Hi, I'm Wei (<EMAIL>, 手机<PHONE>). Order #20231105 from "
                        "<IP> with version 1.2.3.4.\n  Thanks!  ")
    assert counts == Counter({"EMAIL": 1, "PHONE": 1, "IP": 1})


def test_the_bearer_token_is_replaced_and_the_header_name_kept():
    scrubbed, _ = scrub_pii(f"Authorization: Bearer {JWT}\nAccept: */*", PiiConfig())
    assert scrubbed == "Authorization: Bearer <SECRET>\nAccept: */*"


def test_a_valid_chinese_id_is_an_id_even_where_it_also_passes_luhn():
    value = "11010519491231002X"
    assert cn_resident_id_ok(value)
    assert [s.type for s in find_pii(f"证件号 {value}")] == ["ID"]


def test_the_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("DE89370400440532013000") and not iban_ok("DE88370400440532013000")
    assert not iban_ok("DE8937040044053201300")  # one digit short for Germany
    assert cn_resident_id_ok("11010519491231002X") and not cn_resident_id_ok("110105194912310021")
    assert not cn_resident_id_ok("110105194902301234")  # 30 February
    # GB 11643's century digits start at 18: born 1880 is a valid (and personal) number.
    assert cn_resident_id_ok("440524188001010014")
    assert [s.type for s in find_pii("身份证：440524188001010014")] == ["ID"]


def test_the_stage_rewrites_documents_and_counts_each_type():
    log = DecisionLog()
    docs = [Document("a", "mail a@b.io or c@d.io"), Document("b", "no personal data here"),
            Document("c", "call 415-555-0132", meta={"k": "v"})]
    out = list(PiiScrubber(PiiConfig()).run(docs, log))
    assert [d.text for d in out] == ["mail <EMAIL> or <EMAIL>", "no personal data here",
                                     "call <PHONE>"]
    assert out[2].meta == {"k": "v"} and not log.counts
    assert log.tallies == Counter({("pii", "EMAIL"): 2, ("pii", "PHONE"): 1,
                                   ("pii", "documents_scrubbed"): 2})


def test_types_and_the_placeholder_are_settings():
    config = PiiConfig(types=("EMAIL",), placeholder="[{type}]")
    assert scrub_pii("a@b.io 415-555-0132", config)[0] == "[EMAIL] 415-555-0132"
    kept = list(PiiScrubber(PiiConfig(enabled=False)).run([Document("a", "a@b.io")],
                                                          DecisionLog()))
    assert kept[0].text == "a@b.io"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"types": ("EMAIL", "PASSPORT")}, "PASSPORT"),
    ({"placeholder": "<PII>"}, "must contain"),
])
def test_a_bad_pii_setting_is_refused_saying_why(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PiiConfig(**kwargs)


def test_the_labelled_set_meets_the_precision_and_recall_targets_per_type():
    lines = (TEST_DATA / "pii" / "labelled.jsonl").read_text(encoding="utf-8").splitlines()
    docs = [json.loads(line) for line in lines]
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    near_hit = 0
    for doc in docs:
        gold = {(s["start"], s["end"], s["type"]) for s in doc["spans"]}
        found = {(s.start, s.end, s.type) for s in find_pii(doc["text"])}
        for key in gold | found:
            (tp if key in gold and key in found else fp if key in found else fn)[key[2]] += 1
        near_hit += sum(any(s < n["end"] and n["start"] < e for s, e, _ in found)
                        for n in doc["near_misses"])
    assert sum(len(d["spans"]) for d in docs) >= 300
    assert sum(len(d["near_misses"]) for d in docs) >= 100 and near_hit == 0
    for type_ in PII_TYPES:
        assert tp[type_] / (tp[type_] + fp[type_]) >= 0.97, (type_, fp[type_])
        assert tp[type_] / (tp[type_] + fn[type_]) >= 0.95, (type_, fn[type_])
