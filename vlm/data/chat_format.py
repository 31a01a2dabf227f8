"""Chat format: renders a conversation into token ids and labels, the same way for training and generation.

A conversation is rendered as segments of three kinds, each tokenized on its own:
- template text (BOS, role headers, end-of-turn): special tokens in it are recognised;
- user/assistant text: special tokens are split into plain text, so a user who types "<image>"
  gets the characters, never a placeholder;
- images: a run of `tokens_per_image` image-token ids per image (per tile with image splitting), never supervised.
Training and generation both go through `encode`, so BOS and headers can never differ between them.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any

from transformers import PreTrainedTokenizerBase

from vlm.compat import encode_plain_text
from vlm.config import ConfigError

IGNORE_INDEX = -100  # label value cross-entropy skips


@dataclass
class ChatFormatConfig:
    bos: str = "auto"  # "auto": the tokenizer's bos_token if it has one; "" for none; or a literal string
    default_system: str | None = None  # put first as a system message when a conversation has none
    role_headers: dict[str, str] = field(
        default_factory=lambda: {
            "system": "<|im_start|>system\n",
            "user": "<|im_start|>user\n",
            "assistant": "<|im_start|>assistant\n",
        }
    )
    end_of_turn: str = "<|im_end|>"  # supervised after each answer: the model learns to stop
    turn_separator: str = "\n"  # template text after end_of_turn, not supervised
    special_tokens: list[str] = field(default_factory=lambda: ["<|im_start|>", "<|im_end|>"])
    check_template: bool = True  # a tokenizer's own chat template must give the same ids (`check_chat_template`)

    def template_words(self) -> list[str]:
        """The template's plain text (role names, separators) without special tokens.

        A locally trained tokenizer must learn these too: otherwise "assistant" falls back to
        seven byte-pieces in every turn and the template outweighs the content.
        """
        texts = [*self.role_headers.values(), self.turn_separator]
        for special in self.special_tokens:
            texts = [text.replace(special, " ") for text in texts]
        return [text.strip(" ") for text in texts if text.strip()]


class ChatFormat:
    def __init__(self, cfg: ChatFormatConfig, tokenizer: PreTrainedTokenizerBase):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.bos = (tokenizer.bos_token or "") if cfg.bos == "auto" else cfg.bos
        self.end_of_turn_ids = self._template(cfg.end_of_turn)
        if not self.end_of_turn_ids:
            raise ConfigError("data.chat.end_of_turn must not be empty: generation needs a token to stop on")

    @property
    def stop_token_id(self) -> int:
        return self.end_of_turn_ids[0]

    @cache
    def _template_cached(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _template(self, text: str) -> list[int]:
        return list(self._template_cached(text)) if text else []

    def text_ids(self, text: str) -> list[int]:
        """Plain text (special-token strings stay characters)."""
        return list(self._text_ids_cached(text))

    @lru_cache(maxsize=1 << 16)  # keyed by (format, text), shared by the formats of this process
    def _text_ids_cached(self, text: str) -> tuple[int, ...]:
        # Datasets repeat their questions and instructions ("Describe the image.", VQA templates): those are
        # tokenized once. Encoding is most of a short sample's preparation (bench/batching.py).
        return tuple(encode_plain_text(self.tokenizer, text))

    def _message_body(self, content: Any, image_runs: Iterator[list[int]]) -> tuple[list[int], list[int]]:
        """A message's ids and their labels-if-supervised: image runs are never supervised."""
        if isinstance(content, str):
            ids = self.text_ids(content)
            return ids, list(ids)
        ids, targets = [], []
        for part in content:
            if part["type"] == "image":
                run = next(image_runs)
                ids += run
                targets += [IGNORE_INDEX] * len(run)
            else:
                text = self.text_ids(part["text"])
                ids += text
                targets += text
        return ids, targets

    def encode(
        self, messages: list[dict], image_runs: list[list[int]], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Token ids and labels; labels keep only assistant text and its end-of-turn tokens.

        `image_runs` holds, per image in order, the ids its `{"type": "image"}` part expands to (image
        placeholders, and with image splitting the tile-position text between the tiles' runs).
        """
        runs = iter(image_runs)
        if self.cfg.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.cfg.default_system}, *messages]
        ids, labels = self._template(self.bos), []
        labels += [IGNORE_INDEX] * len(ids)
        for message in messages:
            header = self._template(self.cfg.role_headers[message["role"]])
            body, targets = self._message_body(message["content"], runs)
            tail = self.end_of_turn_ids
            sep = self._template(self.cfg.turn_separator)
            supervised = message["role"] == "assistant"
            ids += header + body + tail + sep
            labels += [IGNORE_INDEX] * len(header)
            labels += (targets + tail) if supervised else [IGNORE_INDEX] * (len(body) + len(tail))
            labels += [IGNORE_INDEX] * len(sep)
        if add_generation_prompt:
            header = self._template(self.cfg.role_headers["assistant"])
            ids += header
            labels += [IGNORE_INDEX] * len(header)
        return ids, labels


# Conversations a tokenizer's own template and ours both render: with and without a system message, several
# turns, a generation prompt; plain text, as special-token text is split into characters by us (on purpose).
TEMPLATE_PROBES = [
    ([{"role": "user", "content": "What colour is it?"}, {"role": "assistant", "content": "Red."},
      {"role": "user", "content": "And the shape?"}], True),
    ([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi there"},
      {"role": "assistant", "content": "Hello! How can I help?"}], False),
]  # fmt: skip


def check_chat_template(chat_format: ChatFormat) -> None:
    """A pretrained (instruct) LM must see the format it was trained on: when the tokenizer carries a chat
    template, our rendering of the probe conversations must give its `apply_chat_template` ids exactly.
    A probe the template refuses (some reject system messages) is not compared."""
    tokenizer = chat_format.tokenizer
    if not chat_format.cfg.check_template or not getattr(tokenizer, "chat_template", None):
        return
    for messages, generation_prompt in TEMPLATE_PROBES:
        try:
            theirs = list(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                        tokenize=True, return_dict=False))  # fmt: skip
        except Exception:  # jinja raises whatever the template author chose (TemplateError, ValueError, ...)
            continue
        ours, _ = chat_format.encode(messages, [], add_generation_prompt=generation_prompt)
        if ours != theirs:
            raise ConfigError(
                "data.chat renders conversations differently from the tokenizer's own chat template, so a pretrained "
                f"instruct LM would be trained and queried in a format it never saw.\n  tokenizer: "
                f"{tokenizer.decode(theirs)!r}\n  data.chat: {tokenizer.decode(ours)!r}\nPick the matching preset "
                "(data/chat=smollm2, data/chat=qwen2), adjust data.chat.*, or set data.chat.check_template=false to "
                "train in another format on purpose. See TROUBLESHOOTING.md#mismatched-chat-template."
            )
