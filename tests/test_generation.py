"""Generation: one routine (evaluation and `python -m vlm.generate`), prompts encoded as in training,
the KV cache changing nothing, and the command line on images and multi-turn prompts.

Run: pytest tests/test_generation.py
"""

import torch
from PIL import Image

from vlm.data.collate import Collator
from vlm.generate import main as generate_main
from vlm.generation import GenerationSettings, generate_answers

MULTI_TURN = {"images": [], "messages": [
    {"role": "user", "content": "Name a round shape."}, {"role": "assistant", "content": "circle"},
    {"role": "user", "content": "And one with corners?"}, {"role": "assistant", "content": "square"}]}  # fmt: skip


def prompts_of(parts, raws):
    return [parts.processor.encode_prompt(raw, i) for i, raw in enumerate(raws)]


def test_prompt_ids_at_generation_are_the_ids_seen_in_training(saved_model):
    parts, _ = saved_model
    for i, raw in enumerate([parts.val_set[0], parts.val_set[1], MULTI_TURN]):
        trained = parts.processor(raw, i)
        prompt = parts.processor.encode_prompt(raw, i)
        assert torch.equal(trained.input_ids[: len(prompt.input_ids)], prompt.input_ids)
        assert trained.labels[len(prompt.input_ids)] != -100  # the answer's first token follows right after


def greedy_by_full_forwards(model, batch: dict, steps: int) -> torch.Tensor:
    """The reference: each new token the argmax of a full forward over the whole (left-padded) sequence so far."""
    batch = {**batch, "labels": None}
    new = []
    for _ in range(steps):
        token = model(batch).logits[:, -1].argmax(-1, keepdim=True)
        new.append(token)
        batch["input_ids"] = torch.cat([batch["input_ids"], token], 1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(token)], 1)
    return torch.cat(new, 1)


def test_cached_greedy_decoding_equals_full_forwards(saved_model):
    """transformers decodes with the KV cache, left-padded prompts of different lengths in one batch: the same
    tokens as recomputing the whole sequence at every step (positions, masks and cache all consistent)."""
    parts, _ = saved_model
    prompts = prompts_of(parts, [parts.val_set[i] for i in range(4)] + [MULTI_TURN])  # different lengths: left padding
    model = parts.model.eval()
    batch = Collator(parts.tokenizer.pad_token_id, padding_side="left")(prompts)
    with torch.no_grad():
        cached = model.generate(batch, max_new_tokens=8, min_new_tokens=8)
        reference = greedy_by_full_forwards(model, batch, 8)
    model.train()
    assert torch.equal(cached, reference)
    assert (
        len(set(map(tuple, cached.tolist()))) > 1
    )  # the perturbed model says different things: the test means something


def test_sampling_settings_reach_transformers(saved_model):
    parts, _ = saved_model
    prompts = prompts_of(parts, [parts.val_set[0]] * 4)
    model = parts.model.eval()
    torch.manual_seed(0)
    sampled = generate_answers(model, parts.tokenizer, prompts, GenerationSettings(8, temperature=5.0, top_k=50), "cpu")
    greedy = generate_answers(model, parts.tokenizer, prompts, GenerationSettings(8), "cpu")
    model.train()
    assert len(set(greedy)) == 1 and len(set(sampled)) > 1  # same prompt: greedy repeats itself, hot sampling does not


def test_generate_command_streams_the_answer_for_images_and_turns(saved_model, tmp_path, capsys):
    parts, directory = saved_model
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 40), (220, 20, 20)).save(image)
    assert generate_main([f"checkpoint={directory}", f"image={image}", "prompt=What colour is the square?",
                          "max_new_tokens=8"]) == 0  # fmt: skip
    raw = {"images": [str(image)], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}]}  # fmt: skip
    expected = generate_answers(
        parts.model.eval(), parts.tokenizer, prompts_of(parts, [raw]), GenerationSettings(8), "cpu"
    )
    parts.model.train()
    assert expected[0].strip() and capsys.readouterr().out.strip() == expected[0].strip()
    turns = 'turns=["Name a round shape.", "circle", "And one with corners?"]'
    assert generate_main([f"checkpoint={directory}", f"images=[{image},{image}]", turns, "max_new_tokens=4"]) == 0
    assert generate_main([f"checkpoint={directory}", "turns=[a,b]"]) == 2  # must end with a question
    assert generate_main([f"checkpoint={directory}", "prompt=hi", "temprature=1"]) == 2
    assert generate_main([f"checkpoint={directory}", "turns=[Why?]"]) == 2  # unquoted YAML: a message, not a traceback
    assert "quote values" in capsys.readouterr().err
    assert generate_main([f"checkpoint={directory}", f"image={tmp_path / 'missing.png'}", "prompt=hi"]) == 1
    assert "TROUBLESHOOTING.md#missing-or-unreadable-image" in capsys.readouterr().err


def test_decoding_feeds_one_new_token_per_step(saved_model):
    """The KV cache is really used: after the prompt, each decoding step feeds the LM one token."""
    parts, _ = saved_model
    model, prompts = parts.model.eval(), prompts_of(parts, [parts.val_set[0]])
    fed = []

    def record(module, args, kwargs):
        given = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
        fed.append(given.shape[1])

    hook = model.lm.register_forward_pre_hook(record, with_kwargs=True)
    generate_answers(model, parts.tokenizer, prompts, GenerationSettings(6), "cpu")
    hook.remove()
    model.train()
    assert len(fed) >= 3 and fed[0] == len(prompts[0].input_ids) and fed[1:] == [1] * (len(fed) - 1)


def generated_ids(model, parts, prompts, settings) -> list[list[int]]:
    """The new token ids of each answer, as transformers' generate returned them."""
    returned = []
    original = model.lm.generate

    def generate(*args, **kwargs):
        returned.append(original(*args, **kwargs))
        return returned[-1]

    model.lm.generate = generate
    try:
        generate_answers(model, parts.tokenizer, prompts, settings, "cpu")
    finally:
        del model.lm.generate
    stop = model.token_ids.stop
    return [[t for t in row.tolist() if t not in (stop, parts.tokenizer.pad_token_id)] for row in returned[0]]


def test_top_p_and_the_repetition_penalty_reach_decoding(saved_model):
    parts, _ = saved_model
    model, prompts = parts.model.eval(), prompts_of(parts, [parts.val_set[i] for i in range(4)])
    greedy = generate_answers(model, parts.tokenizer, prompts, GenerationSettings(8), "cpu")
    torch.manual_seed(0)
    nucleus = GenerationSettings(8, temperature=5.0, top_p=1e-9)  # only the likeliest token is left to sample
    assert generate_answers(model, parts.tokenizer, prompts, nucleus, "cpu") == greedy
    repeats = generated_ids(model, parts, prompts, GenerationSettings(24))
    penalised = generated_ids(model, parts, prompts, GenerationSettings(24, repetition_penalty=1e9))
    model.train()
    repeated = lambda answers: sum(len(ids) - len(set(ids)) for ids in answers)  # noqa: E731
    assert repeated(repeats) > 0  # greedy repeats itself somewhere ...
    assert repeated(penalised) < repeated(repeats)  # ... and the penalty makes it repeat less


def test_stop_strings_end_answers_before_them(saved_model):
    """A benchmark task's `until`: each answer is cut before the first stop string, and decoding stops there."""
    parts, _ = saved_model
    model = parts.model.eval()
    prompts = prompts_of(parts, [parts.val_set[i] for i in range(4)])
    uncut = generate_answers(model, parts.tokenizer, prompts, GenerationSettings(12), "cpu")
    stop = next(a[len(a) // 2] for a in uncut if len(a) > 2)  # a character from inside an answer
    cut = generate_answers(model, parts.tokenizer, prompts, GenerationSettings(12, stop_strings=stop), "cpu")
    assert any(stop in a for a in uncut)
    assert cut == [a.split(stop, 1)[0] for a in uncut]
