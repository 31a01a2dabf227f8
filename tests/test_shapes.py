"""The shapes dataset: deterministic, balanced, train/validation never share a scene+question, and a record's kind is
the kind of the question evaluation scores.

Run: pytest tests/test_shapes.py
"""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from vlm.data.llava import LlavaConfig, LlavaDataset
from vlm.data.shapes import KINDS, Scene, ShapesConfig, ShapesVQA, given_away, valid_questions, weighted_choice
from vlm.data.shapes_export import export
from vlm.evaluation import evaluate, majority_baseline


def test_same_seed_same_samples_other_seed_other_samples():
    a, b = ShapesVQA(ShapesConfig(seed=3), "train", 32), ShapesVQA(ShapesConfig(seed=3), "train", 32)
    c = ShapesVQA(ShapesConfig(seed=4), "train", 32)
    for i in (0, 7, 99):
        assert a[i]["messages"] == b[i]["messages"] and np.array_equal(a[i]["images"][0], b[i]["images"][0])
    assert any(a[i]["messages"] != c[i]["messages"] for i in range(10))


def questions_asked(sample: dict) -> list[str]:
    texts = []
    for message in sample["messages"]:
        if message["role"] == "user":
            content = message["content"]
            texts += [content] if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"]
    return texts


def test_weighted_choice_draws_what_numpys_choice_draws():
    """The extra question turns are drawn with it: the same index and the same draws taken from the generator keep
    every training sample what `rng.choice` made it."""
    for seed in range(500):
        n = seed % 15 + 1
        weights = np.random.default_rng(seed + 1000).random(n) * 3
        weights[seed % n] = 0.0 if n > 1 and seed % 4 == 0 else weights[seed % n]  # a kind weighted out
        p = weights / weights.sum()
        ours, numpys = np.random.default_rng(seed), np.random.default_rng(seed)
        assert weighted_choice(ours, p) == numpys.choice(n, p=p), seed
        assert ours.random() == numpys.random()


def test_splits_do_not_overlap_in_any_question_turn():
    cfg = ShapesConfig(train_size=3000, val_size=300, questions_per_image=4)
    train, val = ShapesVQA(cfg, "train", 32), ShapesVQA(cfg, "val", 32)
    train_keys = {
        Scene(train.scene(i).objects, question, "", "").key()
        for i in range(len(train))
        for question in questions_asked(train[i])
    }
    # most training images carry several questions (a 1-object scene one: any other would be given away)
    assert sum(len(questions_asked(train[i])) > 1 for i in range(len(train))) > 0.75 * len(train)
    assert all(len(questions_asked(val[i])) == 1 for i in range(len(val)))
    val_keys = {val.scene(i).key() for i in range(len(val))}
    assert len(val_keys) > 250  # validation is varied, not one scene repeated
    assert not train_keys & val_keys  # keys are the discrete scene + question, so pixel jitter cannot hide a repeat


def test_all_kinds_present_and_majority_baseline_low():
    val = ShapesVQA(ShapesConfig(val_size=1000), "val", 32)
    kinds = Counter(val[i]["kind"] for i in range(len(val)))
    assert set(kinds) == set(KINDS) and min(kinds.values()) > 150
    assert majority_baseline([val[i]["answer"] for i in range(len(val))]) <= 0.20


def test_extra_questions_have_unique_referents_and_true_answers():
    cfg = ShapesConfig(train_size=200, questions_per_image=6)
    train = ShapesVQA(cfg, "train", 32)
    for i in range(len(train)):
        truth = {q.text: q.answer for q in valid_questions(train.scene(i).objects)}
        sample = train[i]
        answers = [m["content"] for m in sample["messages"] if m["role"] == "assistant"]
        for question, answer in zip(questions_asked(sample), answers):
            assert truth[question] == answer, (i, question)


def test_no_turn_is_answered_by_the_turns_before_it():
    train = ShapesVQA(ShapesConfig(train_size=500, questions_per_image=6), "train", 32)
    for i in range(len(train)):
        by_text = {q.text: q for q in valid_questions(train.scene(i).objects)}
        turns = [by_text[text] for text in questions_asked(train[i])]
        objects_asked = [q.cell for q in turns if q.cell is not None]
        assert len(objects_asked) == len(set(objects_asked)), (i, turns)  # never two turns about one object
        for n, turn in enumerate(turns):
            if turn.cell is None:  # "What colour is the circle?" before it would imply one circle
                assert all(earlier.shape != turn.shape for earlier in turns[:n] if earlier.cell is not None), (i, turns)
    # the examples the rule exists for
    question = {q.text: q for q in valid_questions(((0, "circle", "red"), (3, "square", "blue")))}
    first = [question["Where is the red circle?"]]
    assert given_away(question["What shape is the red object?"], first)
    assert given_away(question["How many circles are there?"], first)
    assert not given_away(question["What shape is the blue object?"], first)
    assert not given_away(question["How many squares are there?"], first)


def test_extra_question_weights_shift_the_training_mix_only():
    def position_share(split: str, weights: dict) -> float:
        data = ShapesVQA(
            ShapesConfig(train_size=300, val_size=300, questions_per_image=3, extra_question_weights=weights), split, 32
        )
        asked = [q for i in range(len(data)) for q in questions_asked(data[i])[1:] if q.startswith("Where")]
        extras = sum(len(questions_asked(data[i])) - 1 for i in range(len(data)))
        return len(asked) / max(1, extras)

    assert position_share("train", {"position": 10.0}) > position_share("train", {}) + 0.2
    val = ShapesVQA(
        ShapesConfig(val_size=50, questions_per_image=3, extra_question_weights={"position": 10.0}), "val", 32
    )
    assert all(len(questions_asked(val[i])) == 1 for i in range(len(val)))
    with pytest.raises(ValueError, match="extra_question_weights.*positoin"):
        ShapesVQA(ShapesConfig(extra_question_weights={"positoin": 2.0}), "train", 32)
    with pytest.raises(ValueError, match="extra_question_weights must be >= 0.*'count': -1.0"):
        ShapesVQA(ShapesConfig(extra_question_weights={"count": -1.0}), "train", 32)


KIND_OF_QUESTION = {"What colour": "colour", "What shape": "shape", "How many": "count", "Where is": "position"}


def kind_of(question: str) -> str:
    """A question's kind read from its words alone: a reference independent of the dataset's own bookkeeping."""
    return next(kind for start, kind in KIND_OF_QUESTION.items() if question.strip().startswith(start))


def test_a_multi_turn_record_is_scored_under_its_last_questions_kind(tiny, tmp_path):
    """Evaluation scores the last answer; the exported `kind` and the per-kind accuracy must be that question's."""
    path = export(tmp_path, records=40, image_size=32)
    records = json.loads(path.read_text())
    asked = [[kind_of(t["value"].replace("<image>\n", "")) for t in r["conversations"] if t["from"] == "human"]
             for r in records]  # fmt: skip
    mixed = [i for i, kinds in enumerate(asked) if len(set(kinds)) > 1 and kinds[0] != kinds[-1]]
    assert mixed, "the corpus must hold multi-turn records whose first and last questions differ in kind"
    assert all(records[i]["kind"] == asked[i][-1] for i in range(len(records)))
    one = mixed[0]
    (tmp_path / "one.json").write_text(json.dumps([records[one]]))
    cfg = LlavaConfig(
        path=str(tmp_path / "one.json"), val_path=str(tmp_path / "one.json"), image_root=str(tmp_path / "images")
    )
    result = evaluate(
        tiny.model, tiny.processor, tiny.tokenizer, LlavaDataset(cfg, "val", 32), [0], 1, 8, torch.device("cpu")
    )
    (prediction,) = result.predictions
    assert prediction["kind"] == asked[one][-1] != asked[one][0]
    assert prediction["answer"] == records[one]["conversations"][-1]["value"]
    assert list(result.accuracy_by_kind) == [asked[one][-1]]
