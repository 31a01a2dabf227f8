"""Validation: loss on every sample, exact-match accuracy of greedy answers where answers are short.

Works on any dataset of the contract (vlm/data/formats.py): the reference answer is the sample's `answer`, or its
last assistant message; `kind`, when given, splits accuracy by kind. Accuracy counts only samples whose
reference fits in `max_new_tokens` (short-answer VQA); long-form data still gets its validation loss.
Bad validation samples are skipped and counted by reason, as in training. With several processes each
evaluates its own samples and `merge_results` combines their sums, so the figures are the one-process ones.
"""

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from vlm.data.bad_samples import BadSample
from vlm.data.collate import Collator
from vlm.data.processing import EncodedSample, SampleProcessor, last_answer
from vlm.data.transfer import move_to
from vlm.generation import GenerationSettings, generate_answers


@dataclass
class EvalResult:
    loss_sum: float  # summed token loss over every evaluated sample
    tokens: int  # their supervised tokens
    predictions: list[dict]  # {"index", "id", "kind", "answer", "prediction", "correct", "exact"}, by index
    skipped: dict[str, int]  # bad validation samples by reason
    num_samples: int  # samples evaluated (not skipped)

    @property
    def loss(self) -> float:
        return self.loss_sum / self.tokens if self.tokens else float("nan")

    @property
    def accuracy(self) -> float | None:
        """Over samples with short answers; None when there are none."""
        return sum(p["correct"] for p in self.predictions) / len(self.predictions) if self.predictions else None

    @property
    def exact_match(self) -> float | None:
        """Predictions identical to the reference but for surrounding white space; None when there are none."""
        return sum(p["exact"] for p in self.predictions) / len(self.predictions) if self.predictions else None

    @property
    def accuracy_by_kind(self) -> dict[str, float]:
        hits, totals = defaultdict(int), defaultdict(int)
        for p in self.predictions:
            totals[p["kind"]] += 1
            hits[p["kind"]] += p["correct"]
        return {kind: hits[kind] / totals[kind] for kind in sorted(totals)}

    def metrics(self) -> dict:
        """The figures a best checkpoint can be chosen by."""
        found = {"val_loss": self.loss, "val_accuracy": self.accuracy}
        return {k: v for k, v in found.items() if v is not None}

    def summary(self) -> dict:
        """The figures of metrics.json and eval.json."""
        return {
            "val_loss": self.loss,
            "val_accuracy": self.accuracy,  # normalised answers (case, surrounding punctuation and space)
            "val_exact_match": self.exact_match,
            "val_accuracy_by_kind": self.accuracy_by_kind,
            "val_samples": self.num_samples,
            "val_accuracy_samples": len(self.predictions),
            "majority_baseline": majority_baseline([p["answer"] for p in self.predictions]),
            "val_skipped": self.skipped,
        }


def normalise_answer(text: str) -> str:
    return text.strip().strip(".!?").strip().lower()


def majority_baseline(answers: list[str]) -> float | None:
    """Accuracy of always giving the most frequent of these (validation) answers."""
    if not answers:
        return None
    counts = Counter(normalise_answer(a) for a in answers)
    return counts.most_common(1)[0][1] / len(answers)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    processor: SampleProcessor,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    indices: Sequence[int],
    batch_size: int,
    max_new_tokens: int,
    device: torch.device,
    in_step: tuple[int, EncodedSample] | None = None,
) -> EvalResult:
    """`in_step` = (batches, filler) when processes must run the same forwards (FSDP gathers each block's
    weights in its forward): every process runs `batches` batches, padding a batch with none of its own
    samples (or prompts) with the zero-weight `filler`, and generation runs until every process is done."""
    train_collate = Collator(tokenizer.pad_token_id, padding_side="right")
    settings = GenerationSettings(max_new_tokens=max_new_tokens)  # greedy: exact match wants the likeliest answer
    was_training = model.training
    model.eval()
    loss_sum, tokens, predictions, skipped = 0.0, 0, [], Counter()
    batches, filler = in_step or (math.ceil(len(indices) / batch_size), None)
    for start in range(0, batches * batch_size, batch_size):
        full, prompts, references = [], [], []
        for index in indices[start : start + batch_size]:
            try:
                raw = dataset[index]
                encoded, prompt = processor.encode_for_eval(raw, index)
            except BadSample as err:
                skipped[err.reason] += 1
                continue
            full.append(encoded)
            answer = raw.get("answer") or last_answer(raw["messages"])
            if (
                len(processor.chat_format.text_ids(answer)) <= max_new_tokens
            ):  # a longer answer cannot be generated whole
                prompts.append(prompt)
                references.append(
                    {"index": index, "id": raw.get("id", index), "kind": raw.get("kind", "all"), "answer": answer}
                )
        if full or filler:
            loss_sum += float(model(move_to(train_collate(full or [filler]), device)).loss_sum)  # the filler adds 0
            tokens += sum(s.num_predicted for s in full)
        if prompts or filler:
            answers = generate_answers(
                model, tokenizer, prompts or [filler], settings, device, synced=filler is not None
            )
            for reference, text in zip(references, answers):
                correct = normalise_answer(text) == normalise_answer(reference["answer"])
                exact = text.strip() == reference["answer"].strip()
                predictions.append({**reference, "prediction": text, "correct": correct, "exact": exact})
    model.train(was_training)
    return EvalResult(loss_sum, tokens, predictions, dict(skipped), len(indices) - sum(skipped.values()))


def merge_results(parts: list[EvalResult]) -> EvalResult:
    """One result from those of processes that each evaluated a part of the samples."""
    skipped = Counter()
    for part in parts:
        skipped.update(part.skipped)
    return EvalResult(
        sum(p.loss_sum for p in parts),
        sum(p.tokens for p in parts),
        sorted((x for p in parts for x in p.predictions), key=lambda x: x["index"]),
        dict(skipped),
        sum(p.num_samples for p in parts),
    )
