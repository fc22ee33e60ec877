"""Language identification with lingua (offline n-gram models), and the allowed-languages filter.

The detector is built once per candidate set and shared (`language_detector`):
lingua's cost grows with the number of languages it chooses among. Measured
on this machine (2 cores shared with other work, so the spread is wide), short
English documents (the fortunes sample, median 14 words) per second, after the
first call has loaded the models (about 2 s for the default set):

| candidates                     | docs/s       | labelled English |
| ------------------------------ | -----------: | ---------------: |
| en, zh                         | 22,000       | 100 %            |
| the 12 of DEFAULT_CANDIDATES   | 2,700-5,000  | 99.0 %           |
| all 75 lingua languages        | 670          | 97.8 %           |

So `allowed_languages=("en",)` drops 14 of the 1,429 fortunes (1.0 %), short
lines lingua reads as another candidate. Off by default (empty allowed set).
Chinese paragraphs run at 28,000-58,000 docs/s whatever the set (the script
alone decides); mixed-script documents at ~4,800 (two detections each).

A document in a language outside the candidates is labelled with the closest
candidate, so the set should hold the languages the corpus may contain, not
only the allowed ones: with candidates {en, zh}, German text would be
"English".

Mixed documents. Chinese and English mixed in one ticket ("我们的模型 runs
on-prem") is ordinary in the corpora we are given. Whole-document detection
names one language (lingua calls such a text Chinese even when half its words
are English), and lingua's own `detect_multiple_languages_of` folds English
terms into the surrounding Chinese run ("里讨论了 latency 和 throughput 的" is one
Chinese run). So a document whose letters are of two scripts, each at least
`mixed_script_min_share` of them, is split by script instead: the CJK
characters are identified as one text (Chinese, Japanese or Korean), the rest
as another, and each language gets its share of the words (a CJK character is
one word, as in quality.py). The document is kept when the allowed languages
together hold at least `min_allowed_share` of its words. So with allowed
{zh, en} a mixed ticket stays; with allowed {en} alone it stays only when
English holds at least half its words; with allowed {zh} alone a Chinese ticket
quoting English terms stays. A document with no letters at all has no
language; with an allowed set it is dropped ("undetermined").
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.data_prep.documents import DecisionLog, Document

if TYPE_CHECKING:
    from lingua import LanguageDetector

STAGE = "quality"
REASON = "quality.language"

DEFAULT_CANDIDATES = ("en", "zh", "ja", "ko", "de", "fr", "es", "it", "pt", "ru", "nl", "ar")
_ISO_CODE = re.compile(r"^[a-z]{2}$")
_CJK_CHAR = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_LETTER = re.compile(f"[{_CJK_CHAR}\uac00-\ud7af]")
"""Han, kana and Hangul: the letters that make a document "CJK" for the script test."""
_CJK_RUN = re.compile(f"[{_CJK_CHAR}\uac00-\ud7af]+")
_WORD = re.compile(f"[{_CJK_CHAR}]|[^\\W\\d_{_CJK_CHAR}]+")
"""A Han or kana character, or a run of other letters."""


@dataclass(kw_only=True, slots=True)
class LanguageConfig:
    allowed_languages: tuple[str, ...] = ()
    """ISO 639-1 codes a kept document may be in ("en", "zh"); empty keeps every language
    and skips detection altogether."""
    candidate_languages: tuple[str, ...] = DEFAULT_CANDIDATES
    """The languages the detector chooses among (ISO 639-1); must include the allowed ones.
    Fewer is faster; empty means all 75 lingua knows (about 7x slower than the default 12)."""
    min_allowed_share: float = 0.5
    """A mixed-script document is kept when allowed languages hold at least this share of
    its words."""
    mixed_script_min_share: float = 0.1
    """A document is mixed-script when CJK and other letters each make up at least this
    share of its letters; only those are split into single-language runs."""
    max_chars: int = 2000
    """Only the first this many characters are examined: enough to name a language, and
    the cost stays flat on long documents."""

    def __post_init__(self) -> None:
        for code in (*self.allowed_languages, *self.candidate_languages):
            if not _ISO_CODE.match(code):
                raise ValueError(f"language code {code!r} is not an ISO 639-1 code "
                                 "(two lower-case letters, e.g. 'en', 'zh')")
        missing = set(self.allowed_languages) - set(self.candidate_languages)
        if self.candidate_languages and missing:
            raise ValueError(
                f"allowed languages {sorted(missing)} are not among candidate_languages "
                f"{list(self.candidate_languages)}; add them there, or the detector never "
                "names them")
        if not 0 < self.min_allowed_share <= 1:
            raise ValueError(f"min_allowed_share {self.min_allowed_share} must be in (0, 1]")
        if not 0 < self.mixed_script_min_share < 0.5:
            raise ValueError(
                f"mixed_script_min_share {self.mixed_script_min_share} must be in (0, 0.5)")
        if self.max_chars < 16:
            raise ValueError(f"max_chars {self.max_chars} must be at least 16")


@functools.cache
def language_detector(candidates: tuple[str, ...]) -> LanguageDetector:
    """One detector per candidate set, built once per process (empty: all languages)."""
    try:
        from lingua import IsoCode639_1, LanguageDetectorBuilder
    except ImportError as exc:  # pragma: no cover - the data-prep extra installs it
        raise RuntimeError("language identification needs lingua-language-detector: "
                           "pip install 'lmforge[data-prep]'") from exc
    if not candidates:
        return LanguageDetectorBuilder.from_all_languages().build()
    codes = []
    for code in candidates:
        try:
            codes.append(IsoCode639_1.from_str(code))
        except ValueError as exc:
            raise ValueError(f"language code {code!r} is not one lingua knows") from exc
    if len(codes) == 1:
        raise ValueError(f"candidate_languages {list(candidates)} must name at least two "
                         "languages (lingua chooses among them)")
    return LanguageDetectorBuilder.from_iso_codes_639_1(*codes).build()


def _word_count(text: str) -> int:
    return sum(1 for _ in _WORD.finditer(text))


def is_mixed_script(text: str, min_share: float) -> bool:
    """CJK and other letters each make up at least `min_share` of the letters."""
    cjk = len(_CJK_LETTER.findall(text))
    letters = sum(1 for c in text if c.isalpha())
    return letters > 0 and min_share <= cjk / letters <= 1 - min_share


class LanguageIdentifier:
    """Names the languages of a text with their shares of its words."""

    def __init__(self, config: LanguageConfig) -> None:
        self.config = config
        self.detector = language_detector(tuple(config.candidate_languages))

    def shares(self, text: str) -> dict[str, float]:
        """ISO 639-1 code -> share of the words; empty when the text has no language."""
        text = text[:self.config.max_chars]
        if is_mixed_script(text, self.config.mixed_script_min_share):
            words: dict[str, int] = {}
            cjk_part = " ".join(_CJK_RUN.findall(text))
            for part in (cjk_part, _CJK_RUN.sub(" ", text)):
                found = self.detector.detect_language_of(part)
                if found is not None:
                    code = found.iso_code_639_1.name.lower()
                    words[code] = words.get(code, 0) + _word_count(part)
            total = sum(words.values())
            if total:
                return {code: n / total for code, n in
                        sorted(words.items(), key=lambda item: -item[1])}
        language = self.detector.detect_language_of(text)
        return {} if language is None else {language.iso_code_639_1.name.lower(): 1.0}

    def language(self, text: str) -> str:
        """The language holding most of the words, or "" when there is none."""
        return next(iter(self.shares(text)), "")


class LanguageFilter:
    """Drops documents not in the allowed languages (`quality.language`), detail "zh:0.7,en:0.3"."""

    name = STAGE

    def __init__(self, config: LanguageConfig) -> None:
        self.config = config
        self.allowed = frozenset(config.allowed_languages)
        self._identifier: LanguageIdentifier | None = None

    def run(self, docs: Iterable[Document], log: DecisionLog) -> Iterator[Document]:
        if not self.allowed:
            yield from docs
            return
        if self._identifier is None:
            self._identifier = LanguageIdentifier(self.config)
        for doc in docs:
            shares = self._identifier.shares(doc.text)
            allowed = sum(share for code, share in shares.items() if code in self.allowed)
            if shares and allowed >= self.config.min_allowed_share - 1e-9:
                yield doc
            else:
                detail = ",".join(f"{code}:{share:.2f}" for code, share in shares.items())
                log.drop(doc, STAGE, REASON, detail=detail or "undetermined")
