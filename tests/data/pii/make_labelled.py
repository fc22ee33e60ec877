"""Writes labelled.jsonl: PII in English and Chinese contexts, and near-misses that are not PII.

    python tests/data/pii/make_labelled.py   # rewrites tests/data/pii/labelled.jsonl

Each line: {"id", "lang": "en"|"zh", "text", "spans": [{"start", "end", "type", "kind"}],
"near_misses": [{"start", "end", "kind"}]}. Offsets are Python string indices
(code points). `type` is the placeholder the scrub must put there (EMAIL,
PHONE, IP, CARD, IBAN, ID, SECRET); `kind` is the finer format (cn_mobile,
ipv6, us_ssn, aws_access_key...). A near-miss is a span that looks like PII
and is not (an order number, a date, a version string, a Luhn-failing card
number, an ID with a wrong check digit): nothing may be detected over it.

The values are synthetic and valid where a checksum exists (Luhn for cards,
mod-97 for IBANs, ISO 7064 for Chinese IDs), generated from a fixed seed; the
sentences are templates written from real tickets, chat logs, configs and
forms. The set was written before the detector and not edited to suit it.
"""

from __future__ import annotations

import base64
import json
import random
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("labelled.jsonl")
SEED = 20240611

Piece = str | tuple[str, str, str] | tuple[str, None, str]
"""Plain text, a PII value (value, type, kind), or a near-miss (value, None, kind)."""

EN_FIRST = ["john", "mary", "wei", "priya", "carlos", "anna", "james", "olivia", "ahmed",
            "sofia", "liam", "emma", "noah", "chloe", "lucas", "mia", "ethan", "zoe"]
EN_LAST = ["smith", "garcia", "chen", "patel", "müller", "johnson", "nguyen", "kowalski",
           "brown", "rossi", "dubois", "tanaka", "silva", "obrien", "kim", "schmidt"]
PINYIN = ["zhangsan", "lisi", "wangwu", "liu.yang", "chen_jing", "zhao.lei", "sun.li",
          "huangxiaoming", "wu.fang", "zhou_tao", "xu.min", "hu.jun", "lin.na", "gao.peng"]
DOMAINS = ["gmail.com", "outlook.com", "acme.io", "example.org", "163.com", "qq.com",
           "126.com", "corp.example.com", "uni-heidelberg.de", "mail.tsinghua.edu.cn",
           "sina.com.cn", "company.co.uk", "startup.ai", "foxmail.com", "yahoo.co.jp"]


class Rng(random.Random):
    def digits(self, n: int) -> str:
        return "".join(self.choice(string.digits) for _ in range(n))


# --- values -----------------------------------------------------------------------------

def email(r: Rng) -> str:
    if r.random() < 0.4:
        local = r.choice(PINYIN) + (str(r.randint(1, 999)) if r.random() < 0.4 else "")
    else:
        first, last = r.choice(EN_FIRST), r.choice(EN_LAST).replace("ü", "u")
        local = r.choice([f"{first}.{last}", f"{first[0]}{last}", f"{first}_{last}",
                          f"{first}{r.randint(1, 99)}", f"{first}.{last}+news",
                          f"{first}-{last}"])
    value = f"{local}@{r.choice(DOMAINS)}"
    return value.title() if r.random() < 0.08 else value


def _luhn_complete(prefix: str, length: int, r: Rng) -> str:
    body = prefix + r.digits(length - len(prefix) - 1)
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            d -= 9 if d > 9 else 0
        total += d
    return body + str((10 - total % 10) % 10)


def card(r: Rng) -> tuple[str, str]:
    brand = r.choice(["visa", "visa", "mc", "mc2", "amex", "discover", "unionpay",
                      "unionpay19", "jcb"])
    prefix, length = {
        "visa": ("4", 16), "mc": (str(r.randint(51, 55)), 16),
        "mc2": (str(r.randint(2221, 2720)), 16), "amex": (r.choice(["34", "37"]), 15),
        "discover": (r.choice(["6011", "65"]), 16), "unionpay": ("62", 16),
        "unionpay19": ("62", 19), "jcb": (str(r.randint(3528, 3589)), 16)}[brand]
    number = _luhn_complete(prefix, length, r)
    sep = r.choice([" ", "-", "", " "])
    if brand == "amex":
        groups = [number[:4], number[4:10], number[10:]]
    else:
        groups = [number[i:i + 4] for i in range(0, len(number), 4)]
    return sep.join(groups), brand


def luhn_failing_16(r: Rng) -> str:
    number = _luhn_complete(r.choice("3456"), 16, r)
    bad = str((int(number[-1]) + r.randint(1, 9)) % 10)
    number = number[:-1] + bad
    sep = r.choice([" ", "-", ""])
    return sep.join(number[i:i + 4] for i in range(0, 16, 4))


IBAN_SHAPES = {  # country: BBAN as (kind, length) parts, 'n' digits, 'a' upper letters, 'c' alnum
    "DE": [("n", 18)], "GB": [("a", 4), ("n", 14)], "FR": [("n", 10), ("c", 11), ("n", 2)],
    "NL": [("a", 4), ("n", 10)], "ES": [("n", 20)], "IT": [("a", 1), ("n", 10), ("c", 12)],
    "CH": [("n", 5), ("c", 12)], "BE": [("n", 12)], "AT": [("n", 16)], "PL": [("n", 24)],
    "SE": [("n", 20)], "IE": [("a", 4), ("n", 14)],
}


def _iban_check(country: str, bban: str) -> str:
    moved = bban + country + "00"
    numeric = "".join(str(int(c, 36)) for c in moved)
    return f"{98 - int(numeric) % 97:02d}"


def iban(r: Rng, valid: bool = True) -> tuple[str, str]:
    country = r.choice(list(IBAN_SHAPES))
    bban = ""
    for kind, n in IBAN_SHAPES[country]:
        pool = {"n": string.digits, "a": string.ascii_uppercase,
                "c": string.digits + string.ascii_uppercase}[kind]
        bban += "".join(r.choice(pool) for _ in range(n))
    check = _iban_check(country, bban)
    if not valid:
        check = r.choice([f"{c:02d}" for c in range(2, 99) if f"{c:02d}" != check])
    compact = country + check + bban
    if r.random() < 0.55:
        return " ".join(compact[i:i + 4] for i in range(0, len(compact), 4)), country
    return compact, country


CN_REGIONS = ["110101", "110105", "310104", "310115", "440305", "440106", "510107", "330106",
              "320102", "420111", "610113", "120101", "500103", "370202", "350203", "430104"]
_CN_WEIGHTS = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]


def _cn_check(body: str) -> str:
    return "10X98765432"[sum(int(c) * w for c, w in zip(body, _CN_WEIGHTS, strict=True)) % 11]


def cn_id(r: Rng, valid: bool = True) -> str:
    year, month = r.randint(1950, 2006), r.randint(1, 12)
    day = r.randint(1, 28)
    body = f"{r.choice(CN_REGIONS)}{year}{month:02d}{day:02d}{r.digits(3)}"
    check = _cn_check(body)
    if not valid:
        check = r.choice([c for c in "0123456789X" if c != check])
    return body + check


def ssn(r: Rng) -> str:
    area = r.choice([n for n in range(1, 900) if n != 666])
    number = f"{area:03d}{r.randint(1, 99):02d}{r.randint(1, 9999):04d}"
    sep = r.choice(["-", "-", "-", " "])
    return f"{number[:3]}{sep}{number[3:5]}{sep}{number[5:]}"


def invalid_ssn(r: Rng) -> str:
    """Area 000, 666 or 9xx, or group 00, or serial 0000: never issued."""
    area, group, serial = f"{r.randint(1, 899):03d}", f"{r.randint(1, 99):02d}", r.digits(4)
    broken = r.choice(["area", "area", "group", "serial"])
    if broken == "area":
        area = r.choice(["000", "666", str(r.randint(900, 999))])
    elif broken == "group":
        group = "00"
    else:
        serial = "0000"
    return f"{area}-{group}-{serial}"


def cn_mobile(r: Rng) -> str:
    number = "1" + r.choice("3456789") + r.digits(9)
    style = r.choice(["plain", "plain", "dash", "space", "+86", "+86 space", "0086", "+86-"])
    if style == "plain":
        return number
    if style == "dash":
        return f"{number[:3]}-{number[3:7]}-{number[7:]}"
    if style == "space":
        return f"{number[:3]} {number[3:7]} {number[7:]}"
    if style == "+86":
        return f"+86{number}"
    if style == "+86 space":
        return f"+86 {number[:3]} {number[3:7]} {number[7:]}"
    if style == "0086":
        return f"0086 {number}"
    return f"+86-{number[:3]}-{number[3:7]}-{number[7:]}"


def cn_landline(r: Rng) -> str:
    area = r.choice(["010", "021", "020", "0755", "0571", "028", "027", "0532"])
    local = str(r.randint(2, 8)) + r.digits(7 if len(area) == 3 else r.choice([6, 7]))
    style = r.choice(["dash", "paren", "space", "+86"])
    if style == "dash":
        return f"{area}-{local}"
    if style == "paren":
        return f"({area}) {local[:4]} {local[4:]}"
    if style == "space":
        return f"{area} {local[:4]} {local[4:]}"
    return f"+86 {area[1:]} {local}"


def us_phone(r: Rng) -> str:
    a, b, c = str(r.randint(201, 989)), str(r.randint(200, 999)), r.digits(4)
    return r.choice([f"({a}) {b}-{c}", f"{a}-{b}-{c}", f"{a}.{b}.{c}", f"+1 {a} {b} {c}",
                     f"+1 ({a}) {b}-{c}", f"+1-{a}-{b}-{c}", f"1-{a}-{b}-{c}"])


def intl_phone(r: Rng) -> str:
    return r.choice([
        lambda: f"+44 20 {r.randint(7000, 8999)} {r.digits(4)}",
        lambda: f"+44 7{r.digits(3)} {r.digits(6)}",
        lambda: f"+49 30 {r.digits(8)}",
        lambda: f"+49 (0)89 {r.digits(3)} {r.digits(4)}",
        lambda: f"+33 1 {r.digits(2)} {r.digits(2)} {r.digits(2)} {r.digits(2)}",
        lambda: f"+33 6 {r.digits(2)} {r.digits(2)} {r.digits(2)} {r.digits(2)}",
        lambda: f"+81 3-{r.digits(4)}-{r.digits(4)}",
        lambda: f"+81 90-{r.digits(4)}-{r.digits(4)}",
        lambda: f"+852 {r.randint(2, 9)}{r.digits(3)} {r.digits(4)}",
        lambda: f"+65 {r.randint(6, 9)}{r.digits(3)} {r.digits(4)}",
        lambda: f"+91 {r.randint(70, 99)}{r.digits(3)} {r.digits(5)}",
        lambda: f"+61 2 {r.digits(4)} {r.digits(4)}",
        lambda: f"+34 {r.randint(600, 699)} {r.digits(3)} {r.digits(3)}",
        lambda: f"0044 20 {r.randint(7000, 8999)} {r.digits(4)}",
        lambda: f"+886 2 {r.digits(4)} {r.digits(4)}",
        lambda: f"+7 495 {r.digits(3)}-{r.digits(2)}-{r.digits(2)}",
    ])()


def ipv4(r: Rng) -> str:
    return r.choice([
        lambda: f"192.168.{r.randint(0, 255)}.{r.randint(1, 254)}",
        lambda: f"10.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}",
        lambda: f"172.{r.randint(16, 31)}.{r.randint(0, 255)}.{r.randint(1, 254)}",
        lambda: f"{r.randint(1, 223)}.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}",
        lambda: f"203.0.113.{r.randint(1, 254)}",
        lambda: f"8.8.{r.choice([8, 4])}.{r.choice([8, 4])}",
    ])()


def ipv6(r: Rng) -> str:
    def h() -> str:
        return format(r.randint(0, 0xFFFF), "x")
    return r.choice([
        lambda: f"2001:db8:{h()}:{h()}::{h()}",
        lambda: f"2001:0db8:{h():0>4}:{h():0>4}:{h():0>4}:{h():0>4}:{h():0>4}:{h():0>4}",
        lambda: f"fe80::{h()}:{h()}:{h()}:{h()}",
        lambda: "::1",
        lambda: f"2400:cb00:{h()}::{h()}:{h()}",
        lambda: f"2409:8a00:{h()}:{h()}:{h()}:{h()}:{h()}:{h()}",
        lambda: f"::ffff:192.0.2.{r.randint(1, 254)}",
        lambda: f"2606:4700:{h()}::{h()}".upper(),
    ])()


def _b64(r: Rng, n: int, alphabet: str = string.ascii_letters + string.digits + "+/") -> str:
    return "".join(r.choice(alphabet) for _ in range(n))


def aws_key_id(r: Rng) -> str:
    return r.choice(["AKIA", "AKIA", "ASIA"]) + "".join(
        r.choice(string.ascii_uppercase + "234567") for _ in range(16))


def pem_block(r: Rng) -> str:
    label = r.choice(["RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY",
                      "ENCRYPTED PRIVATE KEY"])
    lines = [_b64(r, 64) for _ in range(r.randint(3, 8))] + [_b64(r, r.randint(10, 60)) + "=="]
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----"


def jwt(r: Rng) -> str:
    def seg(obj: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
    header = seg({"alg": r.choice(["HS256", "RS256"]), "typ": "JWT"})
    payload = seg({"sub": r.digits(8), "name": r.choice(EN_FIRST), "iat": 1700000000})
    return f"{header}.{payload}.{_b64(r, 43, string.ascii_letters + string.digits + '-_')}"


def opaque_token(r: Rng) -> str:
    return r.choice([
        lambda: _b64(r, r.randint(32, 48), string.ascii_letters + string.digits),
        lambda: "ghp_" + _b64(r, 36, string.ascii_letters + string.digits),
        lambda: "sk_live_" + _b64(r, 24, string.ascii_letters + string.digits),
        lambda: "sk-proj-" + _b64(r, 40, string.ascii_letters + string.digits + "_-"),
        lambda: "xoxb-" + r.digits(12) + "-" + r.digits(12) + "-" + _b64(r, 24),
        lambda: "AIza" + _b64(r, 35, string.ascii_letters + string.digits + "_-"),
    ])()


# --- documents --------------------------------------------------------------------------

def pii_value(r: Rng, kind: str) -> tuple[str, str]:
    """(value, type) for a PII kind."""
    if kind == "email":
        return email(r), "EMAIL"
    if kind == "cn_mobile":
        return cn_mobile(r), "PHONE"
    if kind == "cn_landline":
        return cn_landline(r), "PHONE"
    if kind == "us_phone":
        return us_phone(r), "PHONE"
    if kind == "intl_phone":
        return intl_phone(r), "PHONE"
    if kind == "ipv4":
        return ipv4(r), "IP"
    if kind == "ipv6":
        return ipv6(r), "IP"
    if kind == "card":
        return card(r)[0], "CARD"
    if kind == "iban":
        return iban(r)[0], "IBAN"
    if kind == "cn_id":
        return cn_id(r), "ID"
    if kind == "us_ssn":
        return ssn(r), "ID"
    if kind == "aws_access_key":
        return aws_key_id(r), "SECRET"
    if kind == "private_key":
        return pem_block(r), "SECRET"
    if kind == "bearer_token":
        return r.choice([jwt(r), opaque_token(r)]), "SECRET"
    if kind == "api_key":
        return opaque_token(r), "SECRET"
    raise ValueError(kind)


Template = Callable[[Rng], list[Piece]]


def P(r: Rng, kind: str) -> tuple[str, str, str]:
    value, type_ = pii_value(r, kind)
    return value, type_, kind


EN_TEMPLATES: list[Template] = [
    lambda r: ["Hi team, please contact ", P(r, "email"), " for access to the staging cluster."],
    lambda r: ["From: ", r.choice(EN_FIRST).title(), " ", r.choice(EN_LAST).title(), " <",
               P(r, "email"), ">\nSubject: refund request\n\nPlease call me back at ",
               P(r, r.choice(["us_phone", "intl_phone"])), " after 5pm."],
    lambda r: ["Customer says the card ", P(r, "card"), " was charged twice on ",
               (r.choice(["2023-11-05", "Nov 5, 2023", "05/11/2023"]), None, "date"), "."],
    lambda r: ["Wire the deposit to IBAN ", P(r, "iban"), " (reference ",
               (f"INV-{r.randint(2019, 2024)}-{r.digits(5)}", None, "invoice_number"), ")."],
    lambda r: ["Employee record: SSN ", P(r, "us_ssn"), ", phone ", P(r, "us_phone"),
               ", email ", P(r, "email"), "."],
    lambda r: [f"{r.choice(['Jan', 'Mar', 'Oct'])} 12 03:14:07 web-{r.randint(1, 9)} sshd[",
               (r.digits(5), None, "pid"), "]: Failed password for root from ",
               P(r, "ipv4"), " port ", r.digits(5), " ssh2"],
    lambda r: ["The API server listens on ", P(r, "ipv6"), " and ", P(r, "ipv4"),
               "; upgrade it to version ", (f"{r.randint(1, 9)}.{r.randint(0, 20)}."
                                            f"{r.randint(0, 9)}.{r.randint(0, 99)}",
                                            None, "version"), " before Friday."],
    lambda r: ["export AWS_ACCESS_KEY_ID=", P(r, "aws_access_key"),
               "\nexport AWS_SECRET_ACCESS_KEY=", (_b64(r, 40), "SECRET", "aws_secret_key"),
               "\nexport AWS_DEFAULT_REGION=us-east-1"],
    lambda r: ["Here is the deploy key, don't share it:\n\n", P(r, "private_key"),
               "\n\nThanks!"],
    lambda r: ["curl -H \"Authorization: Bearer ", P(r, "bearer_token"),
               "\" https://api.example.com/v1/models"],
    lambda r: ["# settings.py\nDEBUG = False\nSTRIPE_API_KEY = \"", P(r, "api_key"),
               "\"\nTIMEOUT = 30"],
    lambda r: ["My new number is ", P(r, "intl_phone"), ", the old one ",
               P(r, "intl_phone"), " no longer works."],
    lambda r: ["Order ", (f"#{r.digits(r.randint(8, 12))}", None, "order_number"),
               " shipped on ", (f"{r.randint(2020, 2024)}-{r.randint(1, 12):02d}-"
                                f"{r.randint(1, 28):02d}", None, "date"),
               ". Questions? Email ", P(r, "email"), " or call ", P(r, "us_phone"), "."],
    lambda r: ["Payment failed for card ", P(r, "card"), " (expiry 0",
               str(r.randint(1, 9)), "/2", str(r.randint(5, 9)), "). Tracking ref ",
               (luhn_failing_16(r), None, "luhn_failing_number"), " is unrelated."],
    lambda r: ["Please update my bank details: ", P(r, "iban"), ". My old account ",
               (iban(r, valid=False)[0], None, "iban_bad_checksum"), " is closed."],
    lambda r: ["Visitor from ", P(r, "ipv4"), " at ",
               (f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}",
                None, "time"), " requested /login with user agent Chrome/",
               (f"{r.randint(100, 125)}.0.{r.randint(1000, 6999)}.{r.randint(10, 200)}",
                None, "version"), "."],
    lambda r: ["Applicant's Chinese ID card: ", P(r, "cn_id"), "; passport scan attached."],
    lambda r: ["git remote: authentication uses token ", P(r, "api_key"), " (rotate monthly)."],
    lambda r: ["[ERROR] ", (f"{r.randint(2022, 2024)}-0{r.randint(1, 9)}-1{r.randint(0, 9)}",
                            None, "date"), " ",
               (f"{r.randint(10, 23)}:{r.randint(10, 59)}:{r.randint(10, 59)}.{r.digits(3)}",
                None, "time"), " upstream ", P(r, "ipv4"), ":8080 timed out"],
    lambda r: ["Direct debit mandate signed. IBAN: ", P(r, "iban"), ", BIC ",
               r.choice(["DEUTDEFFXXX", "NWBKGB2L", "BNPAFRPP", "ABNANL2A"]), "."],
    lambda r: ["Saved payment method: ", P(r, "card"), ". Billing contact ", P(r, "email"), "."],
    lambda r: ["W-9 received for contractor, TIN/SSN ", P(r, "us_ssn"), ", signed ",
               (f"{r.randint(1, 12)}/{r.randint(1, 28)}/{r.randint(2021, 2024)}", None, "date"),
               "."],
    lambda r: ["Guest registration - PRC resident ID ", P(r, "cn_id"), ", room ",
               str(r.randint(101, 1520)), ", checkout ",
               (f"{r.randint(2023, 2024)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}",
                None, "date"), "."],
    lambda r: ["Call the front desk at ", P(r, "us_phone"),
               " or text the on-call engineer at ", P(r, "us_phone"), "."],
]

ZH_TEMPLATES: list[Template] = [
    lambda r: ["您好，我的手机号是", P(r, "cn_mobile"), "，请尽快联系我。"],
    lambda r: ["联系人：", r.choice(["张伟", "王芳", "李娜", "刘洋", "陈静"]), "\n电话：",
               P(r, "cn_mobile"), "\n邮箱：", P(r, "email"), "\n地址：北京市海淀区中关村大街1号"],
    lambda r: ["订单号：", (r.digits(18), None, "order_number"), "，下单时间",
               (f"{r.randint(2021, 2024)}年{r.randint(1, 12)}月{r.randint(1, 28)}日",
                None, "date"), "，收货人电话", P(r, "cn_mobile"), "。"],
    lambda r: ["身份证号码：", P(r, "cn_id"), "，办理日期：",
               (f"{r.randint(2020, 2024)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}",
                None, "date"), "。"],
    lambda r: ["客户反馈信用卡", P(r, "card"), "被重复扣款，请财务核实发票号",
               (r.digits(8), None, "invoice_number"), "。"],
    lambda r: ["服务器地址：", P(r, "ipv4"), "，备用地址 ", P(r, "ipv6"), "，当前版本 v",
               (f"{r.randint(1, 5)}.{r.randint(0, 9)}.{r.randint(0, 9)}.{r.randint(0, 9)}",
                None, "version"), "。"],
    lambda r: ["公司座机", P(r, "cn_landline"), "，传真", P(r, "cn_landline"),
               "，工作时间9:00-18:00。"],
    lambda r: ["请把合同发到", P(r, "email"), "，抄送", P(r, "email"), "，谢谢！"],
    lambda r: ["海外汇款请使用IBAN：", P(r, "iban"), "，汇款附言写订单编号",
               (f"SO{r.digits(10)}", None, "order_number"), "。"],
    lambda r: ["配置文件里不要写明文密钥：\naws_access_key_id = ", P(r, "aws_access_key"),
               "\naws_secret_access_key = ", (_b64(r, 40), "SECRET", "aws_secret_key"), "\n"],
    lambda r: ["请求头带上 Authorization: Bearer ", P(r, "bearer_token"), " 即可调用接口。"],
    lambda r: ["我把私钥贴在这里了，用完删掉：\n", P(r, "private_key"), "\n"],
    lambda r: ["用户", r.choice(["小王", "老李", "阿强"]), "（身份证",
               (cn_id(r, valid=False), None, "cn_id_bad_check"), "，经核对校验位错误）提交了申请，"
               "手机", P(r, "cn_mobile"), "。"],
    lambda r: ["美国同事的社会安全号码（SSN）是", P(r, "us_ssn"), "，请勿外传。"],
    lambda r: ["快递单号", (r.digits(r.choice([12, 13, 15])), None, "tracking_number"),
               "，如有问题请致电客服", P(r, "cn_mobile"), "或发邮件到", P(r, "email"), "。"],
    lambda r: ["香港办公室电话", P(r, "intl_phone"), "，上海办公室", P(r, "cn_landline"), "。"],
    lambda r: ["日志：", (f"{r.randint(2022, 2024)}-{r.randint(10, 12)}-{r.randint(10, 28)}",
                       None, "date"), " ",
               (f"{r.randint(10, 23)}:{r.randint(10, 59)}:{r.randint(10, 59)}", None, "time"),
               " 来自 ", P(r, "ipv4"), " 的请求被拒绝，token=", P(r, "api_key")],
    lambda r: ["退款请打到这张卡：", P(r, "card"), "，持卡人", r.choice(["赵磊", "孙丽"]), "。"],
    lambda r: ["开户人身份证：", P(r, "cn_id"), "\n银行卡号：", P(r, "card"), "\n预留手机：",
               P(r, "cn_mobile")],
    lambda r: ["收款账户（IBAN）", P(r, "iban"), "，开户行 ",
               r.choice(["Deutsche Bank", "HSBC UK", "BNP Paribas"]), "，金额 EUR ",
               (f"{r.randint(1, 99)},{r.digits(3)}.{r.digits(2)}", None, "amount"), "。"],
]

NEAR_MISS_TEMPLATES: list[Template] = [
    lambda r: ["Your order ", (f"#{r.digits(10)}", None, "order_number"),
               " will arrive within 3-5 business days."],
    lambda r: ["Invoice No. ", (r.digits(8), None, "invoice_number"), " dated ",
               (f"{r.randint(1, 28):02d}.{r.randint(1, 12):02d}.{r.randint(2019, 2024)}",
                None, "date"), " is attached."],
    lambda r: ["Release notes for version ",
               (f"{r.randint(1, 9)}.{r.randint(0, 12)}.{r.randint(0, 9)}.{r.randint(0, 30)}",
                None, "version"), ": fixed a crash on startup."],
    lambda r: ["Build ", (f"{r.randint(1, 20)}.{r.randint(0, 9)}.{r.randint(0, 99)}."
                          f"{r.randint(0, 250)}", None, "version"),
               " passed all tests in ", str(r.randint(2, 59)), " minutes."],
    lambda r: ["Meeting moved to ", (f"{r.randint(2023, 2025)}/{r.randint(1, 12):02d}/"
                                     f"{r.randint(1, 28):02d}", None, "date"), " at ",
               (f"{r.randint(9, 17)}:{r.choice(['00', '15', '30', '45'])}", None, "time"), "."],
    lambda r: ["ISBN ", (f"978-{r.randint(0, 9)}-{r.digits(3)}-{r.digits(5)}-{r.randint(0, 9)}",
                         None, "isbn"), " is out of print."],
    lambda r: ["The test card number ", (luhn_failing_16(r), None, "luhn_failing_number"),
               " fails validation, as expected."],
    lambda r: ["参考编号", (cn_id(r, valid=False), None, "cn_id_bad_check"), "校验失败。"],
    lambda r: ["SSN field contains ", (invalid_ssn(r), None, "ssn_invalid_range"),
               ", which is not a valid number."],
    lambda r: ["订单编号", (r.digits(r.choice([16, 19, 20])), None, "order_number"),
               "已发货，预计", (f"{r.randint(1, 12)}月{r.randint(1, 28)}日", None, "date"),
               "送达。"],
    lambda r: ["请升级到", (f"{r.randint(1, 9)}.{r.randint(0, 9)}.{r.randint(0, 9)}."
                         f"{r.randint(0, 9)}", None, "version"), "版本后重试。"],
    lambda r: ["MAC address ", (":".join(f"{r.randint(0, 255):02X}" for _ in range(6)),
                                None, "mac_address"), " is on the allow list."],
    lambda r: ["Commit ", (_b64(r, 40, "0123456789abcdef"), None, "git_sha"),
               " fixes the race in the scheduler."],
    lambda r: ["Install with npm i lodash@", (f"4.17.{r.randint(10, 21)}", None, "version"),
               " and retina images as icon@2x.png."],
    lambda r: ["Send it to the bearer of this letter, and keep your api_key=",
               ("YOUR_API_KEY", None, "placeholder_secret"), " out of the repo."],
    lambda r: ["The public certificate:\n",
               ("-----BEGIN CERTIFICATE-----\n" + "\n".join(_b64(r, 64) for _ in range(3))
                + "\n-----END CERTIFICATE-----", None, "certificate"), "\n"],
    lambda r: ["Amount due: ", (f"${r.randint(1, 999)},{r.digits(3)},{r.digits(3)}.{r.digits(2)}",
                                None, "amount"), " by the end of the quarter."],
    lambda r: ["金额：￥", (f"{r.randint(10, 99)},{r.digits(3)},{r.digits(3)}.00", None, "amount"),
               "，合同编号", (f"HT-{r.randint(2020, 2024)}-{r.digits(4)}", None, "contract_number"),
               "。"],
    lambda r: ["See section ", (f"{r.randint(1, 9)}.{r.randint(1, 9)}.{r.randint(1, 9)}."
                                f"{r.randint(1, 9)}", None, "section_number"),
               " of the spec, and the OID ",
               ("1.3.6.1.4.1." + str(r.randint(1000, 99999)), None, "oid"), "."],
    lambda r: ["坐标 ", (f"{r.randint(20, 45)}.{r.digits(4)}, {r.randint(100, 125)}.{r.digits(4)}",
                       None, "coordinates"), "，邮编", (r.digits(6), None, "postcode"), "。"],
    lambda r: ["Order ", (f"{r.digits(11)}", None, "order_number"), " total ",
               (f"{r.randint(10, 999)}.{r.digits(2)}", None, "amount"), " USD, placed ",
               (f"{r.randint(2020, 2024)}{r.randint(10, 12)}{r.randint(10, 28)}", None, "date"),
               "."],
    lambda r: ["UUID ", (f"{_b64(r, 8, '0123456789abcdef')}-{_b64(r, 4, '0123456789abcdef')}-"
                         f"4{_b64(r, 3, '0123456789abcdef')}-a{_b64(r, 3, '0123456789abcdef')}-"
                         f"{_b64(r, 12, '0123456789abcdef')}", None, "uuid"),
               " was not found."],
]


def render(pieces: list[Piece]) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    text = ""
    spans: list[dict[str, Any]] = []
    near: list[dict[str, Any]] = []
    for piece in pieces:
        if isinstance(piece, str):
            text += piece
            continue
        value, type_, kind = piece
        start = len(text)
        text += value
        if type_ is None:
            near.append({"start": start, "end": len(text), "kind": kind})
        else:
            spans.append({"start": start, "end": len(text), "type": type_, "kind": kind})
    return text, spans, near


def build(r: Rng) -> list[dict[str, Any]]:
    docs = []
    plan = ([("en", t) for t in EN_TEMPLATES] * 8 + [("zh", t) for t in ZH_TEMPLATES] * 9
            + [("near", t) for t in NEAR_MISS_TEMPLATES] * 5)
    r.shuffle(plan)
    for i, (lang, template) in enumerate(plan):
        text, spans, near = render(template(r))
        if lang == "near":
            lang = "zh" if any("\u4e00" <= c <= "\u9fff" for c in text) else "en"
        docs.append({"id": f"pii-{i:04d}", "lang": lang, "text": text, "spans": spans,
                     "near_misses": near})
    return docs


def main() -> None:
    docs = build(Rng(SEED))
    with OUT.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    spans = [s for d in docs for s in d["spans"]]
    near = [s for d in docs for s in d["near_misses"]]
    print(f"{len(docs)} documents, {len(spans)} PII spans, {len(near)} near-misses -> {OUT}")


if __name__ == "__main__":
    main()
