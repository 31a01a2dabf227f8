"""Our model as an lmms-eval model named `vlm`: `lmms-eval --model vlm --model_args pretrained=DIR` (registered by
the `lmms_eval.models` entry point in pyproject.toml: `vlm.harness.lmms_eval_models`), `python -m vlm.benchmark`,
and training's benchmark runs, which serve the live model the same way.

A request becomes the raw sample of the dataset contract (vlm/data/formats.py): the task's images, in the order the
task gives them, before its question, as `python -m vlm.generate` puts them (`question_sample`). So a benchmark
prompt is encoded as training and `vlm.generate` encode one (BOS, role headers, end of turn; data/chat_format.py).
Answers come from the one generation routine (`generate_answers`: left-padded batches) with the task's settings:
max_new_tokens, temperature, top_p and its `until` stop strings. Multiple-choice tasks ask for "log-likelihoods":
each choice is scored as the assistant's reply, on its own tokens (not the end of turn after it), and returned as
lmms-eval's models return it and as its scoring expects (it picks the choice with the lowest value): the mean
negative log-likelihood per token, the loss, not a log-probability (lmms-eval issue #370).
"""

import functools
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from PIL import Image
from transformers import PreTrainedTokenizerBase

from vlm.config import ConfigError
from vlm.data.bad_samples import BadSample
from vlm.data.chat_format import IGNORE_INDEX
from vlm.data.collate import Collator
from vlm.data.conversation import question_sample
from vlm.data.processing import EncodedSample, SampleProcessor
from vlm.data.transfer import move_to
from vlm.generation import GenerationSettings, generate_answers
from vlm.pretrained import load_pretrained
from vlm.training.distributed import build_accelerator

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# lmms-eval generation settings that mean nothing to a greedy or sampled decode of ours (we do not beam-search)
HARMLESS_SETTINGS = {"do_sample", "num_beams", "image_aspect_ratio", "image_sizes"}


@dataclass
class Served:
    """What answers a request: a model in eval mode, with the tokenizer and processor it was trained with."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    processor: SampleProcessor
    device: torch.device


def generation_settings(gen_kwargs: dict, default_max_new_tokens: int, task: str) -> GenerationSettings:
    """A task's `generation_kwargs` as our settings; what we cannot honour is an error, not silently changed."""
    kwargs = dict(gen_kwargs)
    if int(kwargs.get("num_beams") or 1) != 1:
        raise ConfigError(f"task {task} asks for beam search (num_beams={kwargs['num_beams']}); vlm generates "
                          "greedily or by sampling: set gen_kwargs=num_beams=1. See TROUBLESHOOTING.md#benchmark-scores-that-differ-from-published-ones.")  # fmt: skip
    temperature = float(kwargs.get("temperature") or 0.0)
    if kwargs.get("do_sample") is False:
        temperature = 0.0
    known = {"max_new_tokens", "temperature", "top_p", "top_k", "until", "repetition_penalty"}
    if unknown := set(kwargs) - known - HARMLESS_SETTINGS:
        _warn_unused(task, tuple(sorted(unknown)))
    return GenerationSettings(
        max_new_tokens=int(kwargs.get("max_new_tokens") or default_max_new_tokens),
        temperature=temperature,
        top_k=kwargs.get("top_k"),
        top_p=kwargs.get("top_p"),
        repetition_penalty=float(kwargs.get("repetition_penalty") or 1.0),
        stop_strings=kwargs.get("until") or (),
    )


@functools.cache
def _warn_unused(task: str, settings: tuple[str, ...]) -> None:
    """Once per task, not per request."""
    log.warning("task %s: generation settings %s are not used by vlm models", task, list(settings))


def is_image(item) -> bool:
    return isinstance(item, Image.Image) or (isinstance(item, str) and Path(item).suffix.lower() in IMAGE_SUFFIXES)


class VlmModel(lmms):
    is_simple = True  # lmms-eval gives the task's prompt text and images; the chat format is ours

    def __init__(
        self,
        pretrained: str | None = None,
        batch_size: int | str = 8,
        device: str | None = None,
        max_new_tokens: int | str = 256,
        served: Served | None = None,
        accelerator: Accelerator | None = None,
        **unused,
    ):
        """`pretrained`: a model directory (checkpoint or export). Training passes `served` (its live model) and
        its `accelerator` instead. Several processes (accelerate launch) each answer their share of requests."""
        super().__init__()
        if unused:  # e.g. max_batch_size, which lmms-eval passes every model
            log.info("vlm model: not used: %s", sorted(unused))
        # As training builds it: gloo on a CPU, and a launcher that started one process of several is an error.
        self.accelerator = accelerator or build_accelerator("cpu" if str(device).startswith("cpu") else "auto", "no")
        if served is None:
            if not pretrained:
                raise ConfigError("the vlm model needs a model directory: --model_args pretrained=DIR "
                                  "(python -m vlm.benchmark: checkpoint=DIR)")  # fmt: skip
            device = torch.device(device) if device else self.accelerator.device
            loaded = load_pretrained(Path(pretrained), device)
            served = Served(loaded.model.eval(), loaded.tokenizer, loaded.processor, device)
        self.served = served
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.unanswered: Counter = Counter()  # per task: requests whose images could not be used (scored wrong)

    @property
    def device(self) -> torch.device:
        return self.served.device

    def clean(self) -> None:
        """lmms-eval frees the model after the requests; ours belongs to the caller (a training run)."""

    # ----- requests -> our samples ---------------------------------------------------------------

    def _images(self, request: Instance) -> list:
        _, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        images = [
            item for visual in visuals or [] for item in (visual if isinstance(visual, (list, tuple)) else [visual])
        ]
        for item in images:
            if not is_image(item):  # lmms-eval gives videos as paths and audio as arrays or dicts
                raise ConfigError(f"task {task} gives {type(item).__name__} inputs ({str(item)[:60]!r}), not "
                                  "images: vlm models read images and text only. See TROUBLESHOOTING.md#benchmark-task-errors.")  # fmt: skip
        return images

    def _prompt(self, request: Instance) -> EncodedSample | None:
        """The generation prompt for a request; None (scored as a wrong answer, counted) if its images are bad."""
        context, _, _, doc_id, task, _ = request.args
        try:
            return self.served.processor.encode_prompt(question_sample(self._images(request), [context]), doc_id)
        except BadSample as err:
            self.unanswered[task] += 1
            log.warning("task %s: %s; answered with nothing (scored wrong)", task, err)
            return None

    def _in_batches(self, requests: list[Instance], encode: Callable, answer: Callable, default) -> list:
        """`answer(encoded samples)` over batches of `batch_size` requests, longest prompts first (less padding, an
        out-of-memory early); `default` for a request `encode` could not use. Results in request order."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))
        results = [default] * len(requests)
        for start in range(0, len(order), self.batch_size):
            encoded = {i: encode(requests[i]) for i in order[start : start + self.batch_size]}
            usable = {i: sample for i, sample in encoded.items() if sample is not None}
            if usable:
                for i, result in zip(usable, answer(list(usable.values()))):
                    results[i] = result
        return results

    # ----- lmms-eval's interface -----------------------------------------------------------------

    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Each request's answer, in request order; requests with the same settings share batches."""
        answers = [""] * len(requests)
        by_settings: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            settings = generation_settings(request.args[1], self.max_new_tokens, request.args[4])
            by_settings.setdefault(tuple(vars(settings).items()), []).append(i)
        s = self.served
        for key, members in by_settings.items():
            settings = GenerationSettings(**dict(key))
            generate = lambda prompts: generate_answers(s.model, s.tokenizer, prompts, settings, s.device)  # noqa: E731
            for i, text in zip(members, self._in_batches([requests[i] for i in members], self._prompt, generate, "")):
                answers[i] = text
        return answers

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(loss of the continuation as the assistant's reply, whether greedy decoding gives it) per request.

        Wrapped in GenerationResult: lmms-eval 0.7.3 turns any other tuple into its string (unwrap_generation_output),
        which its multiple-choice scoring cannot read; tests/test_benchmark.py checks that this is still so."""
        collate = Collator(self.served.tokenizer.pad_token_id, padding_side="right")
        score = lambda rows: self._score(collate(rows))  # noqa: E731
        return [
            GenerationResult(text=value)
            for value in self._in_batches(requests, self._scored, score, (float("inf"), False))
        ]

    def _scored(self, request: Instance) -> EncodedSample | None:
        """Prompt + continuation, labels on the continuation only (lmms-eval's delimiter before it dropped)."""
        prompt = self._prompt(request)
        if prompt is None:
            return None
        _, target, _, doc_id, task, split = request.args
        continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
        answer = torch.tensor(self.served.processor.chat_format.text_ids(str(continuation).lstrip()), dtype=torch.long)
        labels = torch.cat([torch.full_like(prompt.labels, IGNORE_INDEX), answer])
        return EncodedSample(prompt.index, torch.cat([prompt.input_ids, answer]), labels, prompt.pixel_values,
                             prompt.num_images)  # fmt: skip

    def _score(self, batch: dict) -> list[tuple[float, bool]]:
        logits = self.served.model(move_to(batch, self.device)).logits.float()
        targets = batch["labels"][:, 1:].to(logits.device)
        scored = targets != IGNORE_INDEX
        log_probs = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        greedy = (logits[:, :-1].argmax(-1) == targets) | ~scored
        return [(float(-lp[mask].mean()), bool(g.all())) for lp, mask, g in zip(log_probs, scored, greedy)]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise ConfigError(
            "multi-round tasks are not supported by the vlm model. See TROUBLESHOOTING.md#benchmark-task-errors."
        )
