"""Generation: one routine (evaluation and `python -m vlm.generate`), prompts encoded as in training,
the KV cache changing nothing, and the command line on images and multi-turn prompts.

Run: pytest tests/test_generation.py
"""

import torch
from PIL import Image

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


def test_cached_and_uncached_greedy_decoding_agree(saved_model):
    parts, _ = saved_model
    prompts = prompts_of(parts, [parts.val_set[i] for i in range(4)] + [MULTI_TURN])  # different lengths: left padding
    model = parts.model.eval()
    answers = {cache: generate_answers(model, parts.tokenizer, prompts, GenerationSettings(8, use_cache=cache), "cpu")
               for cache in (True, False)}  # fmt: skip
    model.train()
    assert answers[True] == answers[False]
    assert any(answers[True])  # the perturbed model says something, so the comparison means something


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
