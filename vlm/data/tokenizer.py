"""Tokenizer: a Hugging Face tokenizer by name or path, or a byte-level BPE trained locally.

The local tokenizer is trained on the dataset's own text at start-up (seconds), so the default
experiment needs no network. Byte-level BPE starts from all 256 bytes, so any text encodes
losslessly: unknown words fall back to bytes, never to an UNK token.
Every special token the chat format and the model need is made sure to exist here, once.
"""

from collections.abc import Iterable
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from vlm.hub import loading


@dataclass
class TokenizerConfig:
    pretrained: str | None = None  # hub name or local directory; null trains a local BPE
    vocab_size: int = 512  # local BPE only
    image_token: str = "<image>"
    pad_token: str = "<|pad|>"  # used only when the tokenizer has no pad token
    bos_token: str = "<|bos|>"  # local BPE only; a pretrained tokenizer keeps its own
    trust_remote_code: bool = False  # run tokenizer code from its repository: only after reading it


def build_tokenizer(cfg: TokenizerConfig, corpus: Iterable[str], format_tokens: list[str]) -> PreTrainedTokenizerBase:
    """Load or train the tokenizer, then add the image, pad and chat-format special tokens."""
    if cfg.pretrained:
        with loading("data.tokenizer.pretrained", cfg.pretrained):
            tokenizer = AutoTokenizer.from_pretrained(cfg.pretrained, trust_remote_code=cfg.trust_remote_code)
    else:
        tokenizer = _train_byte_level_bpe(cfg, corpus, format_tokens)
    missing = [t for t in [cfg.image_token, *format_tokens] if t not in tokenizer.all_special_tokens]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": cfg.pad_token})
    return tokenizer


def _train_byte_level_bpe(
    cfg: TokenizerConfig, corpus: Iterable[str], format_tokens: list[str]
) -> PreTrainedTokenizerFast:
    specials = list(dict.fromkeys([cfg.pad_token, cfg.bos_token, cfg.image_token, *format_tokens]))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: lossless fallback
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=cfg.bos_token, pad_token=cfg.pad_token)
