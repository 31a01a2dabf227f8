"""The loss is PAD-safe: padding (left or right, any amount) changes neither loss nor gradients.

Run: pytest tests/test_loss.py
"""

import torch

from vlm.data.collate import Collator


def loss_and_grads(model, batch, tokens: int):
    """`tokens`: the batch's supervised-token count, as the trainer counts it (`EncodedSample.num_predicted`)."""
    model.zero_grad(set_to_none=True)
    out = model(batch)
    loss = out.loss_sum / tokens
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def with_extra_padding(batch: dict, extra: int, side: str, pad_id: int) -> dict:
    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (extra, 0) if side == "left" else (0, extra), value=value)

    return {
        **batch,
        "input_ids": pad(batch["input_ids"], pad_id),
        "attention_mask": pad(batch["attention_mask"], 0),
        "labels": pad(batch["labels"], -100),
    }


def test_padding_changes_neither_loss_nor_gradients(tiny):
    model = tiny.model.train()
    samples = [tiny.processor(tiny.train_set[i], i) for i in range(4)]
    pad_id = tiny.tokenizer.pad_token_id
    # Pad tokens carrying the EOS id would be caught by an id-based mask; we mask by position.
    reference = Collator(pad_id, padding_side="right")(samples)
    variants = [
        Collator(pad_id, padding_side="left")(samples),
        with_extra_padding(reference, 7, "right", pad_id),
        with_extra_padding(Collator(pad_id, padding_side="left")(samples), 5, "left", pad_id),
        with_extra_padding(reference, 6, "right", tiny.model.token_ids.stop),  # pad id == end-of-turn id
    ]
    tokens = sum(s.num_predicted for s in samples)
    ref_loss, ref_grads = loss_and_grads(model, reference, tokens)
    assert ref_grads.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for batch in variants:
        loss, grads = loss_and_grads(model, batch, tokens)
        assert torch.allclose(loss, ref_loss, rtol=0, atol=1e-6), (loss, ref_loss)
        for name, grad in grads.items():
            assert torch.allclose(grad, ref_grads[name], rtol=1e-5, atol=1e-7), name


def test_loss_is_mean_over_supervised_tokens(tiny):
    model = tiny.model.eval()
    samples = [tiny.processor(tiny.train_set[i], i) for i in range(3)]
    batch = Collator(tiny.tokenizer.pad_token_id)(samples)
    with torch.no_grad():
        out = model(batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    supervised = labels != -100
    manual = torch.nn.functional.cross_entropy(logits[supervised], labels[supervised], reduction="mean")
    tokens = sum(s.num_predicted for s in samples)  # the count the trainer divides by
    assert tokens == int(supervised.sum())
    assert torch.allclose(out.loss_sum / tokens, manual, atol=1e-6)


def test_greedy_generation_matches_training_forward(tiny):
    """Left-padded generation sees the same positions and BOS as training: first token == forward argmax."""
    model = tiny.model.eval()
    prompts = [tiny.processor.encode_prompt(tiny.val_set[i], i) for i in range(3)]
    batch = Collator(tiny.tokenizer.pad_token_id, padding_side="left")(prompts)
    with torch.no_grad():
        generated = model.generate(batch, max_new_tokens=1)[:, 0]
        for row, prompt in enumerate(prompts):  # each prompt alone, unpadded, through the training forward
            single = Collator(tiny.tokenizer.pad_token_id)([prompt])
            assert int(model(single).logits[0, -1].argmax()) == int(generated[row])


def test_pad_equal_to_eos_is_masked_by_position_and_real_eos_is_supervised(tiny):
    """A collator whose pad id is the end-of-turn id and whose labels copy the ids on padding (as a naive one
    would): only the model's own attention-mask masking keeps the loss equal to the unpadded samples' sum,
    and every real end-of-turn token (one per answer) is still a target."""
    model, eos = tiny.model.eval(), tiny.model.token_ids.stop
    max_length = tiny.processor.max_length
    indices = [i for i in range(16) if len(tiny.processor(tiny.train_set[i], i).input_ids) < max_length][
        :4
    ]  # untruncated
    samples = [tiny.processor(tiny.train_set[i], i) for i in indices]
    batch = Collator(eos, padding_side="right")(samples)
    padding = batch["attention_mask"] == 0
    assert padding.any()
    batch["labels"] = batch["labels"].masked_fill(padding, eos)
    with torch.no_grad():
        out = model(batch)
        alone = [model(Collator(eos)([s])).loss_sum for s in samples]
    assert torch.allclose(out.loss_sum, torch.stack(alone).sum(), rtol=1e-5)
    answers = sum(sum(m["role"] == "assistant" for m in tiny.train_set[i]["messages"]) for i in indices)
    assert answers > 4  # multi-turn conversations
    assert sum(int((s.labels == eos).sum()) for s in samples) == answers
