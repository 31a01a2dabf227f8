"""Validation: loss on every sample, exact-match accuracy of greedy answers where answers are short.

Works on any dataset of the contract (datasets.py): the reference answer is the sample's `answer`, or its
last assistant message; `kind`, when given, splits accuracy by kind. Accuracy counts only samples whose
reference fits in `max_new_tokens` (short-answer VQA); long-form data still gets its validation loss.
Bad validation samples are skipped and counted by reason, as in training.
"""

from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from vlm.data.bad_samples import BadSample
from vlm.data.collate import Collator
from vlm.data.processing import SampleProcessor, last_answer
from vlm.training.device import move_to


@dataclass
class EvalResult:
    loss: float  # summed token loss / supervised tokens over every evaluated sample
    accuracy: float | None  # over samples with short answers; None when there are none
    accuracy_by_kind: dict[str, float]
    predictions: list[dict]  # {"index", "id", "kind", "answer", "prediction", "correct"}
    skipped: dict[str, int]  # bad validation samples by reason
    num_samples: int  # samples evaluated (not skipped)

    def metrics(self) -> dict:
        """The figures a best checkpoint can be chosen by."""
        found = {"val_loss": self.loss, "val_accuracy": self.accuracy}
        return {k: v for k, v in found.items() if v is not None}


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
    num_samples: int,
    batch_size: int,
    max_new_tokens: int,
    device: torch.device,
) -> EvalResult:
    train_collate = Collator(tokenizer.pad_token_id, padding_side="right")
    prompt_collate = Collator(tokenizer.pad_token_id, padding_side="left")
    was_training = model.training
    model.eval()
    loss_sum, tokens, predictions, skipped = 0.0, 0, [], Counter()
    count = min(num_samples, len(dataset))
    for start in range(0, count, batch_size):
        full, prompts, references = [], [], []
        for index in range(start, min(start + batch_size, count)):
            try:
                raw = dataset[index]
                encoded, prompt = processor.encode_for_eval(raw, index)
            except BadSample as err:
                skipped[err.reason] += 1
                continue
            full.append(encoded)
            answer = raw.get("answer") or last_answer(raw["messages"])
            if len(processor.chat_format.text_ids(answer)) <= max_new_tokens:  # a longer answer cannot be generated whole
                prompts.append(prompt)
                references.append({"index": index, "id": raw.get("id", index), "kind": raw.get("kind", "all"), "answer": answer})
        if full:
            loss_sum += float(model(move_to(train_collate(full), device)).loss_sum)
            tokens += sum(s.num_predicted for s in full)
        if prompts:
            new_tokens = model.generate(move_to(prompt_collate(prompts), device), max_new_tokens)
            for reference, text in zip(references, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                predictions.append({**reference, "prediction": text})
    model.train(was_training)
    accuracy, by_kind = _score(predictions)
    evaluated = count - sum(skipped.values())
    return EvalResult(loss_sum / tokens if tokens else float("nan"), accuracy, by_kind, predictions, dict(skipped), evaluated)


def _score(predictions: list[dict]) -> tuple[float | None, dict[str, float]]:
    hits, totals = defaultdict(int), defaultdict(int)
    for p in predictions:
        p["correct"] = normalise_answer(p["prediction"]) == normalise_answer(p["answer"])
        totals[p["kind"]] += 1
        hits[p["kind"]] += p["correct"]
    by_kind = {kind: hits[kind] / totals[kind] for kind in sorted(totals)}
    return (sum(hits.values()) / len(predictions) if predictions else None), by_kind
