"""Chat data: conversations rendered with a chat template, and which tokens the loss sees.

A chat document (services/data_prep/sources.py reads `messages`, or a prompt and
a response) is rendered with the dataset's chat template: the base tokenizer's,
or one the user gave (`lmforge run --chat-template FILE`). The loss must cover
the assistant's tokens only: training on the user's turns teaches the model to
write questions, and on the template's markup to repeat it.

Where the assistant's text lies is found by rendering prefixes, the way the
template itself would at serving time: for the assistant turn i, the rendering
of turns [0, i) with the generation prompt ends where the answer begins, and
the rendering of turns [0, i] ends where it ends (its end-of-turn markup
included, so the model learns to stop). A template whose prefix renderings are
not prefixes of the whole (one that rewrites earlier turns once later ones
exist) is refused: its assistant spans cannot be located. The whole rendering is
then tokenized once, and a token is trained when its characters overlap an
assistant span (a token merged across the boundary, such as a newline and the
answer's first letters, carries answer text, so it is trained).

The document separator (the tokenizer's end-of-text token appended after each
document) is not trained: it belongs to the packing, not to the conversation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmforge.base_models import CHAT_TEMPLATE_FILE
from services.data_prep.documents import Document
from services.data_prep.sources import DatasetInputError

if TYPE_CHECKING:
    from services.data_prep.packing import ShardWriter

PACKING_MODES = ("packed", "unpacked")
"""How the trainer lays conversations into sequences (dataset.json's chat.packing)."""


@dataclass(frozen=True, slots=True)
class RenderedChat:
    text: str
    """The template's rendering of the whole conversation."""
    spans: tuple[tuple[int, int], ...]
    """[start, end) character ranges of the assistant turns in `text`."""
    ids: np.ndarray
    """int64 token ids of `text` (no separator)."""
    loss_mask: np.ndarray
    """uint8, 1 where the token is trained (overlaps an assistant span)."""


class ChatRenderer:
    """Renders conversations with one template and tokenizes them with their loss mask."""

    def __init__(self, tokenizer_dir: Path, template: str) -> None:
        from lmforge.modeling import load_tokenizer

        self._hf = load_tokenizer(tokenizer_dir)
        self._tokenizer = self._hf.backend_tokenizer
        self.template = template

    def _render(self, messages: list[dict[str, str]], *, generation_prompt: bool,
                doc_id: str) -> str:
        try:
            text = self._hf.apply_chat_template(messages, chat_template=self.template,
                                                tokenize=False,
                                                add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja2 raises its own family; name the document
            raise DatasetInputError(f"chat template failed on document {doc_id!r}: "
                                    f"{type(exc).__name__}: {exc}") from None
        assert isinstance(text, str)
        return text

    def render(self, messages: list[dict[str, str]], doc_id: str = "") -> RenderedChat:
        text = self._render(messages, generation_prompt=False, doc_id=doc_id)
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], generation_prompt=True, doc_id=doc_id) \
                if i else ""
            through = self._render(messages[: i + 1], generation_prompt=False, doc_id=doc_id)
            if not (through.startswith(before) and text.startswith(through)):
                raise DatasetInputError(
                    f"chat template is not prefix-stable on document {doc_id!r}: rendering "
                    f"turns 0..{i} does not begin the whole conversation's rendering, so "
                    "the assistant's tokens cannot be located; use a template that renders "
                    "each turn independently of the later ones (--chat-template FILE)")
            if len(through) > len(before):
                spans.append((len(before), len(through)))
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        ids = np.asarray(encoding.ids, dtype=np.int64)
        mask = np.zeros(len(ids), dtype=np.uint8)
        for t, (start, end) in enumerate(encoding.offsets):
            if any(start < e and end > s for s, e in spans):
                mask[t] = 1
        return RenderedChat(text, tuple(spans), ids, mask)


def chat_template_for(user_template: str, tokenizer_template: str | None,
                      tokenizer_dir: Path, source: str) -> str:
    """The template a chat dataset is rendered with, written into the dataset's tokenizer
    so that the trained model (and the gateway serving it) uses the same one."""
    if user_template:
        (tokenizer_dir / CHAT_TEMPLATE_FILE).write_text(user_template, encoding="utf-8")
        return user_template
    if tokenizer_template:
        if not (tokenizer_dir / CHAT_TEMPLATE_FILE).is_file():
            (tokenizer_dir / CHAT_TEMPLATE_FILE).write_text(tokenizer_template,
                                                            encoding="utf-8")
        return tokenizer_template
    raise DatasetInputError(
        f"the dataset holds chat records but the tokenizer ({source}) has no chat template "
        f"({CHAT_TEMPLATE_FILE} or tokenizer_config.json's chat_template); give one with "
        "`lmforge run --chat-template FILE`")


def encode_chat_documents(renderer: ChatRenderer, docs: Iterable[Document], eos_id: int,
                          writer: ShardWriter, *, seq_len: int,
                          clusters: Iterator[int] | None = None) -> dict[str, int]:
    """Render, tokenize and mask each conversation into `writer` (tokens and loss mask),
    each followed by the untrained separator; returns tallies: conversations, trained
    (assistant) tokens, conversations longer than `seq_len` (the trainer keeps
    their first `seq_len` tokens), and the assistant tokens inside those first
    `seq_len`: the ones the trainer can learn from."""
    tallies = {"conversations": 0, "assistant_tokens": 0, "longer_than_seq_len": 0,
               "assistant_tokens_within_seq_len": 0}
    for doc in docs:
        if doc.messages is None:
            raise DatasetInputError(f"document {doc.id!r} is plain text in a chat dataset; "
                                    "give chat records only (messages, or prompt + "
                                    "response), or prepare the text as its own dataset")
        rendered = renderer.render(doc.messages, doc.id)
        ids = np.append(rendered.ids, eos_id)
        mask = np.append(rendered.loss_mask, np.uint8(0))
        kwargs: dict[str, Any] = {"loss_mask": mask}
        if clusters is not None:
            kwargs["cluster"] = int(next(clusters))
        writer.add(ids, **kwargs)
        tallies["conversations"] += 1
        tallies["assistant_tokens"] += int(mask.sum())
        tallies["longer_than_seq_len"] += int(len(ids) > seq_len)
        tallies["assistant_tokens_within_seq_len"] += int(mask[:seq_len].sum())
    return tallies


def check_trainable(tallies: dict[str, int], part: str, seq_len: int) -> None:
    """Refuse a split whose conversations have no assistant token within their first
    `seq_len` tokens: the trainer keeps only those, so it would train on no target and
    the held-out assistant perplexity could not be measured; said here, before any
    training, instead of by a trainer failing every delivery after the steps."""
    if tallies["conversations"] and not tallies["assistant_tokens_within_seq_len"]:
        raise DatasetInputError(
            f"no {part} conversation has an assistant token within its first {seq_len} "
            f"tokens ({tallies['longer_than_seq_len']} of {tallies['conversations']} are "
            f"longer; the trainer keeps the first {seq_len} of each): raise "
            "LMFORGE_DATAPREP_SEQ_LEN or shorten the system and user turns")
