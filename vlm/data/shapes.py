"""Shapes VQA: a procedurally generated visual question-answering dataset, deterministic by seed.

Each image is a 2x2 grid of cells, each empty or holding one coloured shape. Four question kinds:
colour, shape, count and position, each with answers drawn uniformly so no answer dominates.
Sample i of a split is generated from (seed, i) alone, so the dataset needs no storage and any
index can be regenerated. Train and validation cannot overlap: a hash of the discrete scene and
question (not the pixel jitter) decides which split may use it, and each split redraws until
it gets one of its own.
Training samples may ask several questions about one image as a multi-turn conversation
(`questions_per_image`, as in LLaVA-style instruction data): the first question is the balanced
one drawn with the scene, the others are further questions the scene answers unambiguously, each
also from the training side of the hash and none answered by the turns before it (no text shortcut).
Validation always asks one question per image.
"""

import bisect
import hashlib
import itertools
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from vlm.config import ConfigError

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 200),
    "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top right", "bottom left", "bottom right")
COUNT_WORDS = ("one", "two", "three", "four")
KINDS = ("colour", "shape", "count", "position")


@dataclass
class ShapesConfig:
    name: str = "shapes"
    train_size: int = 20000
    val_size: int = 1000
    seed: int = 0
    val_fraction: float = 0.1  # share of discrete (scene, question) space reserved for validation
    questions_per_image: int = 1  # training only: up to this many question turns per image
    # Training only: relative odds of each kind among the extra question turns (default 1 each). Lets a
    # run spend more supervision on the kind that learns slowest; validation is never affected.
    extra_question_weights: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Scene:
    objects: tuple  # ((cell, shape, colour), ...)
    question: str
    answer: str
    kind: str

    def key(self) -> str:
        return objects_key(self.objects) + self.question


def objects_key(objects: tuple) -> str:
    """The scene part of a question's key (which side of the train/validation split it falls on)."""
    return f"{sorted(objects)}|"


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    """`str(rng.choice(options))`: the same draw from the generator, without converting the list to an array."""
    return options[rng.integers(len(options))]


def weighted_choice(rng: np.random.Generator, p: np.ndarray) -> int:
    """`rng.choice(len(p), p=p)` (the same index for the same generator state, the same draw taken from it) in a
    third of the time: numpy's steps (the cumulative sum, scaled by its last value, searched with one `random()`)
    without its argument checks."""
    cdf = list(itertools.accumulate(p.tolist()))
    return bisect.bisect_right([c / cdf[-1] for c in cdf], rng.random())


def _others(rng: np.random.Generator, options, exclude) -> str:
    return _pick(rng, [o for o in options if o != exclude])


def draw_scene(rng: np.random.Generator) -> Scene:
    """Pick a question kind and a uniformly drawn answer, then build a scene that makes it true."""
    kind = KINDS[rng.integers(len(KINDS))]
    cells = list(rng.permutation(len(CELLS)))
    colours, shapes = list(COLOURS), list(SHAPES)
    if kind == "count":
        shape, k = _pick(rng, shapes), int(rng.integers(1, 5))
        extra = int(rng.integers(0, 4 - k + 1))
        objects = [(c, shape, _pick(rng, colours)) for c in cells[:k]]
        objects += [(c, _others(rng, shapes, shape), _pick(rng, colours)) for c in cells[k : k + extra]]
        return Scene(tuple(objects), f"How many {shape}s are there?", COUNT_WORDS[k - 1], kind)
    target = (cells[0], _pick(rng, shapes), _pick(rng, colours))
    n_extra = int(rng.integers(0, 4))
    _, shape, colour = target
    extra = []
    for c in cells[1 : 1 + n_extra]:
        if kind == "colour":  # the asked shape must be unique
            extra.append((c, _others(rng, shapes, shape), _pick(rng, colours)))
        elif kind == "shape":  # the asked colour must be unique
            extra.append((c, _pick(rng, shapes), _others(rng, colours, colour)))
        else:  # position: the asked (colour, shape) pair must be unique
            other_shape = _pick(rng, shapes)
            other_colour = _others(rng, colours, colour) if other_shape == shape else _pick(rng, colours)
            extra.append((c, other_shape, other_colour))
    objects = (target, *extra)
    if kind == "colour":
        return Scene(objects, f"What colour is the {shape}?", colour, kind)
    if kind == "shape":
        return Scene(objects, f"What shape is the {colour} object?", shape, kind)
    return Scene(objects, f"Where is the {colour} {shape}?", CELLS[target[0]], kind)


class Question(NamedTuple):
    text: str
    answer: str
    kind: str
    cell: int | None  # the object asked about; None for a count question
    shape: str  # that object's shape, or the shape counted


def valid_questions(objects: tuple) -> list[Question]:
    """Every question the scene answers unambiguously (the referent is unique)."""
    shapes = [shape for _, shape, _ in objects]
    colours = [colour for _, _, colour in objects]
    pairs = [(colour, shape) for _, shape, colour in objects]
    questions = []
    for cell, shape, colour in objects:
        if shapes.count(shape) == 1:
            questions.append(Question(f"What colour is the {shape}?", colour, "colour", cell, shape))
        if colours.count(colour) == 1:
            questions.append(Question(f"What shape is the {colour} object?", shape, "shape", cell, shape))
        if pairs.count((colour, shape)) == 1:
            questions.append(Question(f"Where is the {colour} {shape}?", CELLS[cell], "position", cell, shape))
    for shape in sorted(set(shapes)):
        questions.append(
            Question(f"How many {shape}s are there?", COUNT_WORDS[shapes.count(shape) - 1], "count", None, shape)
        )
    return questions


def given_away(question: Question, earlier: list[Question]) -> bool:
    """Whether earlier turns of the conversation answer `question` without looking at the image.

    Any earlier turn about the same object does ("Where is the red circle?" answers "What shape is the red
    object?"), and so does any earlier turn naming the counted shape as one object ("What colour is the
    circle?" implies one circle). A model trained on such turns learns to copy from the text, a shortcut
    that validation (one question per image) cannot use.
    """
    if question.cell is None:
        return any(turn.cell is not None and turn.shape == question.shape for turn in earlier)
    return any(turn.cell == question.cell for turn in earlier)


def render(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw the scene as an HxWx3 uint8 array; shapes get a small random size and offset in their cell."""
    image = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    half = size // 2
    for cell, shape, colour in scene.objects:
        side = int(half * rng.uniform(0.55, 0.8))
        x0 = (cell % 2) * half + int(rng.integers(0, half - side + 1))
        y0 = (cell // 2) * half + int(rng.integers(0, half - side + 1))
        box = (x0, y0, x0 + side - 1, y0 + side - 1)
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x0 + side / 2, y0), (x0, y0 + side - 1), (x0 + side - 1, y0 + side - 1)], fill=fill)
    return np.asarray(image)


def in_validation_space(scene: Scene, val_fraction: float) -> bool:
    return _key_in_validation_space(scene.key(), val_fraction)


def _key_in_validation_space(key: str, val_fraction: float) -> bool:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


class ShapesVQA(Dataset):
    """Map-style dataset of raw samples: {"images", "messages", "answer", "kind"}."""

    def __init__(self, cfg: ShapesConfig, split: str, image_size: int):
        self.cfg, self.split, self.image_size = cfg, split, image_size
        unknown = set(cfg.extra_question_weights) - set(KINDS)
        if unknown:
            raise ConfigError(
                f"data.dataset.extra_question_weights has unknown kinds {sorted(unknown)}; kinds: {KINDS}"
            )
        negative = {kind: w for kind, w in cfg.extra_question_weights.items() if w < 0}
        if negative:
            raise ConfigError(f"data.dataset.extra_question_weights must be >= 0 (0 leaves a kind out), got {negative}")
        self.size = cfg.train_size if split == "train" else cfg.val_size
        self._split_id = 0 if split == "train" else 1

    def __len__(self) -> int:
        return self.size

    def _draw(self, index: int) -> tuple[Scene, np.random.Generator]:
        if not 0 <= index < self.size:
            raise IndexError(f"{self.split} index {index} out of range [0, {self.size})")
        rng = np.random.default_rng([self.cfg.seed, self._split_id, index])
        want_val = self.split != "train"
        while True:
            scene = draw_scene(rng)
            if in_validation_space(scene, self.cfg.val_fraction) == want_val:
                return scene, rng

    def scene(self, index: int) -> Scene:
        return self._draw(index)[0]

    def _extra_questions(self, scene: Scene, rng: np.random.Generator) -> list[Question]:
        """Further questions on the training side of the split, each one not given away by the turns before it."""
        if self.split != "train" or self.cfg.questions_per_image <= 1:
            return []
        valid = valid_questions(scene.objects)
        asked = [next(q for q in valid if q.text == scene.question)]
        scene_key = objects_key(scene.objects)
        candidates = [
            q for q in valid
            if q.text != scene.question and self.cfg.extra_question_weights.get(q.kind, 1.0) > 0
            and not _key_in_validation_space(scene_key + q.text, self.cfg.val_fraction)
        ]  # fmt: skip
        while len(asked) < self.cfg.questions_per_image:
            candidates = [q for q in candidates if q not in asked and not given_away(q, asked)]
            if not candidates:
                break
            weights = np.array([self.cfg.extra_question_weights.get(q.kind, 1.0) for q in candidates])
            asked.append(candidates[weighted_choice(rng, weights / weights.sum())])
        return asked[1:]

    def __getitem__(self, index: int) -> dict:
        scene, rng = self._draw(index)
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": scene.question}]},
            {"role": "assistant", "content": scene.answer},
        ]
        scored = scene  # evaluation scores the last answer: `answer` and `kind` are the last question's
        for scored in self._extra_questions(scene, rng):
            messages += [{"role": "user", "content": scored.text}, {"role": "assistant", "content": scored.answer}]
        return {
            "images": [render(scene, self.image_size, rng)],
            "messages": messages,
            "answer": scored.answer,
            "kind": scored.kind,
        }

    def corpus(self, limit: int = 2000):
        """Text to train the local tokenizer on: questions and answers of the first `limit` samples."""
        for i in range(min(limit, self.size)):
            rng = np.random.default_rng([self.cfg.seed, self._split_id, i])
            scene = draw_scene(rng)
            yield scene.question
            yield scene.answer
