"""Answers from conversations with images: the one generation routine of evaluation and `python -m vlm.generate`.

Prompts are encoded exactly as in training up to the assistant header (`SampleProcessor.encode_prompt`),
left-padded into a batch, and decoded by transformers' `generate` on the LM's input embeddings: greedy or sampled,
stopping each sample at its end-of-turn token (or at the first of the caller's stop strings, which is cut from the
answer with whatever follows it, as benchmark harnesses expect), always with the KV cache (transformers forces the cache when a
decoder-only model generates from input embeddings, so there is no uncached mode to offer; tests/test_generation.py
checks the cached decoding against full forwards instead).
"""

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from vlm.data.collate import Collator
from vlm.data.processing import EncodedSample
from vlm.data.transfer import move_to


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop_strings: tuple[str, ...] = ()  # an answer ends before the first of these (a benchmark task's `until`)

    def __post_init__(self):  # one string or any sequence of them (a command line's list, a task's `until`)
        stops = self.stop_strings
        self.stop_strings = (stops,) if isinstance(stops, str) else tuple(str(stop) for stop in stops)

    def generate_kwargs(self, tokenizer: PreTrainedTokenizerBase) -> dict:
        """transformers `generate` arguments; sampling settings only when sampling."""
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.temperature > 0,
                  "repetition_penalty": self.repetition_penalty}  # fmt: skip
        if self.temperature > 0:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        if self.stop_strings:  # transformers matches them on the decoded text, so it needs the tokenizer
            kwargs.update(stop_strings=list(self.stop_strings), tokenizer=tokenizer)
        return kwargs

    def cut(self, answer: str) -> str:
        """The answer before the first stop string (the stop string matched by `generate` is in the new tokens)."""
        for stop in self.stop_strings:
            answer = answer.split(stop, 1)[0]
        return answer


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[EncodedSample],
    settings: GenerationSettings,
    device: torch.device,
    synced: bool = False,
    streamer: BaseStreamer | None = None,
) -> list[str]:
    """One answer per prompt. `synced`: every process runs forwards until all are done (FSDP)."""
    batch = move_to(Collator(tokenizer.pad_token_id, padding_side="left")(prompts), device)
    new_tokens = model.generate(batch, synced=synced, streamer=streamer, **settings.generate_kwargs(tokenizer))
    return [settings.cut(answer) for answer in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
