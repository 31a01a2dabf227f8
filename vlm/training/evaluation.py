"""Validation: exact-match accuracy of greedy answers, overall and per question kind."""

from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from vlm.data.collate import Collator
from vlm.data.processing import SampleProcessor
from vlm.training.device import move_to


@dataclass
class EvalResult:
    accuracy: float
    accuracy_by_kind: dict[str, float]
    predictions: list[dict]  # {"index", "kind", "answer", "prediction", "correct"}


def normalise_answer(text: str) -> str:
    return text.strip().strip(".!?").strip().lower()


def majority_baseline(answers: list[str]) -> float:
    """Accuracy of always giving the most frequent of these (validation) answers."""
    counts = Counter(normalise_answer(a) for a in answers)
    return counts.most_common(1)[0][1] / len(answers)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    processor: SampleProcessor,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    num_samples: int,
    batch_size: int,
    max_new_tokens: int,
    device: torch.device,
) -> EvalResult:
    collate = Collator(tokenizer.pad_token_id, padding_side="left")
    was_training = model.training
    model.eval()
    predictions = []
    count = min(num_samples, len(dataset))
    for start in range(0, count, batch_size):
        indices = range(start, min(start + batch_size, count))
        raws = [dataset[i] for i in indices]
        batch = collate([processor.encode_prompt(raw, i) for raw, i in zip(raws, indices)])
        new_tokens = model.generate(move_to(batch, device), max_new_tokens)
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for index, raw, text in zip(indices, raws, texts):
            predictions.append({"index": index, "kind": raw["kind"], "answer": raw["answer"], "prediction": text})
    model.train(was_training)
    return _score(predictions)


def _score(predictions: list[dict]) -> EvalResult:
    hits, totals = defaultdict(int), defaultdict(int)
    for p in predictions:
        p["correct"] = normalise_answer(p["prediction"]) == normalise_answer(p["answer"])
        totals[p["kind"]] += 1
        hits[p["kind"]] += p["correct"]
    by_kind = {kind: hits[kind] / totals[kind] for kind in sorted(totals)}
    return EvalResult(sum(hits.values()) / max(1, len(predictions)), by_kind, predictions)
