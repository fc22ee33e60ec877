from __future__ import annotations

import dataclasses

import pytest

from services.data_prep.documents import DecisionLog, Document
from services.data_prep.quality import (
    QualityConfig,
    QualityFilter,
    count_words,
    quality_issue,
    split_words,
)
from tests.conftest import TEST_DATA

# 114 distinct content words (no Gopher stop word among them).
VOCABULARY = [
    "apple", "bridge", "candle", "dragon", "engine", "forest", "garden", "harbor", "island",
    "jungle", "kettle", "ladder", "meadow", "needle", "orchard", "pepper", "quartz", "river",
    "saddle", "temple", "umbrella", "valley", "window", "yellow", "zipper", "anchor", "basket",
    "copper", "desert", "eagle", "feather", "glacier", "hammer", "insect", "jacket", "kitchen",
    "lantern", "marble", "nickel", "ocean", "pillow", "rabbit", "silver", "tunnel", "violin",
    "walnut", "arrow", "blossom", "cactus", "dolphin", "ember", "falcon", "granite", "helmet",
    "ivory", "jasmine", "kernel", "lemon", "magnet", "nectar", "oyster", "parrot", "quiver",
    "ribbon", "spider", "thunder", "velvet", "willow", "yogurt", "zenith", "amber", "beacon",
    "cobalt", "dagger", "echo", "fossil", "goblet", "hazel", "indigo", "jigsaw", "koala",
    "lotus", "mosaic", "nutmeg", "opal", "pebble", "quill", "raven", "sapphire", "tulip",
    "urchin", "vortex", "wombat", "atlas", "bamboo", "cedar", "dune", "fjord", "gecko",
    "heron", "iris", "juniper", "kiwi", "lilac", "mango", "nebula", "orbit", "prism", "quasar",
    "reef", "sequoia", "tundra", "vapor", "wharf",
]
PROSE = (
    "The committee met on Tuesday to review the budget and the hiring plan for next year. "
    "Most members agreed that the support team needs two more engineers, because ticket "
    "volume has grown steadily since the spring release. A few raised concerns about "
    "office space, and the chair asked finance to prepare a short report with options "
    "before the next meeting in March."
)


def test_ordinary_prose_passes_every_rule():
    assert count_words(PROSE) >= 60
    assert quality_issue(PROSE, QualityConfig()) is None


# (reason code, document, the config change that turns exactly that rule off)
CASES = [
    ("quality.too_short", "Thanks again.", {"min_words": None}),
    ("quality.too_long", PROSE, {"max_words": None}),
    ("quality.mean_word_length", "We go up to it as he is by me so I do an ox in my den.",
     {"min_mean_word_length": None}),
    ("quality.mean_word_length",
     "Internationalization responsibilities notwithstanding, incomprehensibilities "
     "characterize telecommunications infrastructures.", {"max_mean_word_length": None}),
    ("quality.symbol_ratio", "Tags #python #golang #rust #kotlin for this week's newsletter",
     {"max_symbol_word_ratio": None}),
    ("quality.ellipsis_lines",
     "The first line of this note runs on and on and then...\n"
     "A second line is complete and says what it means clearly.\n"
     "The third line also stops in the middle of a thought and...\n"
     "The last line closes the note with a proper full stop here.",
     {"max_ellipsis_line_fraction": None}),
    ("quality.bullet_lines",
     "\n".join(f"- {' '.join(VOCABULARY[i:i + 5])}" for i in range(0, 40, 5)),
     {"max_bullet_line_fraction": None}),
    ("quality.alpha_words", "Readings were 1234 5678 9012 3456 7890 during the test run",
     {"min_alpha_word_fraction": None}),
    ("quality.stop_words", " ".join(VOCABULARY[:60]), {"min_stop_words": None}),
    ("quality.duplicate_lines",
     "Buy now today.\nBuy now today.\nBuy now today.\nWelcome to our shop.\nOpen daily from nine.",
     {"max_duplicate_line_fraction": None, "max_duplicate_line_char_fraction": None}),
    ("quality.duplicate_paragraphs",
     "Click here.\n\n" + "\n".join(" ".join(VOCABULARY[i:i + 6]) for i in range(0, 30, 6))
     + "\n\nClick here.",
     {"max_duplicate_paragraph_fraction": None, "max_duplicate_paragraph_char_fraction": None}),
    ("quality.top_ngram",
     "The " + " ".join(f"data pipeline {VOCABULARY[2 * i]} {VOCABULARY[2 * i + 1]}."
                       for i in range(14)) + " And that is all.",
     {"top_ngram_max_fraction": {}}),
    ("quality.duplicate_ngrams",
     " ".join(VOCABULARY[:40]) + " the quarterly numbers look better than anyone expected "
     + " ".join(VOCABULARY[40:80]) + " the quarterly numbers look better than anyone expected "
     + " ".join(VOCABULARY[80:90]) + " and so on.",
     {"duplicate_ngram_max_fraction": {}}),
]


@pytest.mark.parametrize(("reason", "text", "off"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_rule_drops_with_its_own_reason_and_only_that_rule(reason, text, off):
    config = QualityConfig(max_words=50) if reason == "quality.too_long" else QualityConfig()
    issue = quality_issue(text, config)
    assert issue is not None and issue[0] == reason, issue
    assert quality_issue(text, dataclasses.replace(config, **off)) is None


def test_every_reason_code_is_covered_by_a_case():
    assert {c[0] for c in CASES} == {
        "quality.too_short", "quality.too_long", "quality.mean_word_length",
        "quality.symbol_ratio", "quality.ellipsis_lines", "quality.bullet_lines",
        "quality.alpha_words", "quality.stop_words", "quality.duplicate_lines",
        "quality.duplicate_paragraphs", "quality.top_ngram", "quality.duplicate_ngrams"}


def test_a_cjk_character_is_a_word_and_cjk_punctuation_is_not():
    assert split_words("机器学习是人工智能的一个分支。") == list("机器学习是人工智能的一个分支")
    assert count_words("我们的模型 runs on-prem，数据不出门。") == 5 + 2 + 5
    assert count_words("東京は大きい都市です。") == 10


CHINESE = ("机器学习是人工智能的一个分支。它使计算机能够从数据中学习，而无需明确编程。"
           "深度学习使用多层神经网络，在图像和语音识别上取得了很大的进展。")


def test_a_chinese_paragraph_is_not_too_short_nor_too_short_in_its_words():
    assert " " not in CHINESE and count_words(CHINESE) > 50
    assert quality_issue(CHINESE, QualityConfig()) is None
    assert quality_issue(CHINESE, QualityConfig(min_words=40)) is None


def test_chinese_with_english_terms_is_judged_as_chinese():
    text = "我们把 GPU 集群的 batch size 调小以后，推理服务的延迟明显下降了，这个改动下周上线。"
    assert quality_issue(text, QualityConfig()) is None


def test_a_chinese_keyword_list_without_function_characters_fails_the_stop_word_rule():
    keywords = ("手机 电脑 平板 耳机 相机 手表 音箱 键盘 鼠标 显示器 路由器 充电宝 "
                "数据线 硬盘 内存 主板 显卡 机箱 电源 风扇 投影仪 打印机 扫描仪 麦克风")
    assert count_words(keywords) >= 50
    issue = quality_issue(keywords, QualityConfig())
    assert issue is not None and issue[0] == "quality.stop_words"


def _fortunes() -> list[str]:
    """The sample split the way data-prep's text reader splits it: blank or `%` lines."""
    docs, lines = [], []
    for line in [*(TEST_DATA / "fortunes-sample.txt").read_text().splitlines(), ""]:
        if line.strip() in ("", "%"):
            if lines:
                docs.append("\n".join(lines).strip())
            lines = []
        else:
            lines.append(line.rstrip())
    return docs


def test_defaults_keep_the_shipped_fortunes_sample_mostly():
    docs = _fortunes()
    log = DecisionLog()
    kept = list(QualityFilter(QualityConfig()).run(
        (Document(f"f#{i}", t) for i, t in enumerate(docs)), log))
    dropped = log.dropped("quality")
    assert len(docs) > 1400 and len(kept) + dropped == len(docs)
    assert dropped / len(docs) < 0.05, log.counts


def test_the_stage_logs_each_drop_and_passes_the_rest_through():
    log = DecisionLog()
    docs = [Document("a", PROSE), Document("b", "Hi."), Document("c", CHINESE)]
    kept = list(QualityFilter(QualityConfig()).run(docs, log))
    assert [d.id for d in kept] == ["a", "c"]
    assert log.counts == {("quality", "quality.too_short"): 1}


def test_a_disabled_stage_keeps_everything():
    log = DecisionLog()
    kept = list(QualityFilter(QualityConfig(enabled=False)).run([Document("b", "Hi.")], log))
    assert [d.id for d in kept] == ["b"] and not log.counts


@pytest.mark.parametrize(("field", "value"), [
    ("max_bullet_line_fraction", 1.5), ("min_mean_word_length", -1.0), ("min_words", 10**6),
    ("top_ngram_max_fraction", {0: 0.2}),
])
def test_a_bad_threshold_is_refused_with_its_name(field, value):
    with pytest.raises(ValueError, match=field):
        QualityConfig(**{field: value})
