"""Chat presets vs the pretrained tokenizers' own templates.

Tiny tokenizers are built here with each family's special tokens, pre-tokenizer and real chat template, saved to a
directory and loaded through `build_tokenizer` (the code path a hub name takes): a text-only conversation rendered
by our chat format must give exactly the ids of the tokenizer's `apply_chat_template`.
"""

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tests.conftest import compose_config
from vlm.config import ConfigError
from vlm.data.chat_format import ChatFormat, check_chat_template
from vlm.data.formats import data_config
from vlm.data.tokenizer import build_tokenizer

# SmolLM2-135M-Instruct's chat_template, verbatim.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen2.5-Instruct's chat_template, verbatim but for the tool-calling branches (`tools`, `tool_calls`, role "tool"),
# which text-only conversations never reach.
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    '{%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}'
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# Qwen2's pre-tokenizer split (then byte-level without its own regex), as in its tokenizer.json.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

CORPUS = [
    "What colour is the square? The square is red. How many shapes are there? Three. Where is the circle?",
    "You are a helpful AI assistant. Describe the image in detail, please: a café, 42 chairs, ünïcödé text.",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What colour is the square?"}, {"role": "assistant", "content": "Red."}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "How many shapes?"},
     {"role": "assistant", "content": "3"}, {"role": "user", "content": "And circles?"},
     {"role": "assistant", "content": "None at all, 0."}],
    [{"role": "user", "content": "Describe it:\nthe café has 42 chairs  and ünïcödé text ..."},
     {"role": "assistant", "content": "A café.\n\nTwo lines!"}],
]  # fmt: skip


def _byte_level_tokenizer(pre_tokenizer, normalizer=None) -> Tokenizer:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizer
    bpe.normalizer = normalizer
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    bpe.train_from_iterator(CORPUS, trainer)
    return bpe


def save_smollm2_like(directory) -> None:
    """SmolLM2's setup: digits split one by one, byte-level BPE, BOS = <|im_start|> (which its template never adds)."""
    pre = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_byte_level_tokenizer(pre), bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>")  # fmt: skip
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    tokenizer.save_pretrained(directory)


def save_qwen2_like(directory) -> None:
    """Qwen2's setup: NFC, its regex split, byte-level BPE, no BOS, pad = <|endoftext|>."""
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    bpe = _byte_level_tokenizer(pre, normalizers.NFC())
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = QWEN2_TEMPLATE
    tokenizer.save_pretrained(directory)


FAMILIES = {"smollm2": save_smollm2_like, "qwen2": save_qwen2_like}


def preset_format(tmp_path, family: str, preset: str) -> ChatFormat:
    FAMILIES[family](tmp_path / family)
    data = data_config(compose_config(f"data/chat={preset}", f"data.tokenizer.pretrained={tmp_path / family}"))
    return ChatFormat(data.chat, build_tokenizer(data.tokenizer, [], data.chat.special_tokens))


@pytest.mark.parametrize("family", FAMILIES)
def test_presets_render_the_tokenizers_own_template_ids(tmp_path, family):
    chat = preset_format(tmp_path, family, family)
    for messages in CONVERSATIONS:
        ours, labels = chat.encode(messages, [])
        assert ours == chat.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert any(label != -100 for label in labels)
        prompt, _ = chat.encode(messages[:-1], [], add_generation_prompt=True)
        assert prompt == chat.tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                                            return_dict=False)  # fmt: skip
    check_chat_template(chat)  # and the start-up check agrees


@pytest.mark.parametrize("family", FAMILIES)
def test_a_mismatched_chat_format_stops_the_build_naming_the_entry(tmp_path, family):
    chat = preset_format(tmp_path, family, "chatml")  # no default system prompt; SmolLM2 would also get a BOS
    with pytest.raises(ConfigError, match="mismatched-chat-template") as err:
        check_chat_template(chat)
    assert "You are" in str(err.value)  # both renderings are shown
    chat.cfg.check_template = False  # training in another format on purpose
    check_chat_template(chat)
