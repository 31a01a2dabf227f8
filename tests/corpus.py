"""A fixture corpus built on disk: good records, one of each kind of bad record, unusual-but-valid ones.

`write_corpus(root)` writes root/images/... (the image root: record paths are relative to it),
root/outside/... (a file the data must never reach, by a relative path, an absolute one or a symlink),
root/data.json, root/data.jsonl (plus one line that is not JSON) and root/hf (a `save_to_disk` dataset
of the same records with a list-of-paths `images` column and a `conversations` column).
EXPECTED_SKIPS is what training on all of it must count.
"""

import io
import json
import struct
import zlib
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

EXPECTED_SKIPS = {
    "image_missing": 1,
    "image_empty": 1,
    "image_truncated": 1,
    "image_not_an_image": 1,
    "image_too_large": 1,
    "image_outside_root": 3,
    "marker_mismatch": 1,
    "nothing_to_learn": 2,
    "malformed_record": 2,
    "truncation_cuts_image": 1,
    "answer_truncated": 1,
}
NUM_RECORDS = 40  # in data.json / hf; data.jsonl has one more line, which is not JSON
LONG_TEXT = " ".join(f"word{i}" for i in range(400))  # far past data.max_length=256 once tokenized


def _png(mode: str, size: tuple[int, int], value) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, value).save(buffer, "PNG")
    return buffer.getvalue()


def _bomb_png(side: int = 40000) -> bytes:
    """A PNG whose header claims side x side pixels (1.6 G) with almost no data: must be refused unread."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def write_images(root: Path) -> None:
    images, outside = root / "images", root / "outside"
    images.mkdir(parents=True, exist_ok=True)
    outside.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images / f"rgb{k}.png")
    Image.new("L", (30, 30), 90).save(images / "gray.png")
    Image.new("CMYK", (30, 30), (0, 255, 255, 0)).save(images / "cmyk.jpg")  # red in CMYK
    Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16)).save(images / "sixteen.png")  # mid grey, 16-bit
    Image.new("RGBA", (30, 30), (255, 0, 0, 0)).save(images / "rgba.png")  # fully transparent
    Image.new("LA", (30, 30), (10, 128)).save(images / "la.png")
    palette = Image.new("P", (30, 30), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(images / "palette.png", transparency=0)
    rotated = Image.new("RGB", (60, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    rotated.save(images / "exif.jpg", exif=exif)
    Image.new("RGB", (1, 1), (0, 255, 0)).save(images / "tiny.png")
    Image.new("RGB", (2000, 8), (9, 9, 9)).save(images / "wide.png")
    (images / "empty.png").write_bytes(b"")
    (images / "truncated.png").write_bytes(_png("RGB", (64, 64), (1, 2, 3))[:60])
    (images / "text.png").write_text("this is not an image")
    (images / "bomb.png").write_bytes(_bomb_png())
    Image.new("RGB", (8, 8)).save(outside / "secret.png")
    link = images / "link.png"
    if not link.exists():
        link.symlink_to(outside / "secret.png")


def _record(rid: str, image, question: str, answer: str = "yes", kind: str | None = None) -> dict:
    record = {"id": rid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        record["image"] = image
    if kind:
        record["kind"] = kind
    return record


def corpus_records(root: Path) -> list[dict]:
    good = [
        _record("good-marker", "rgb0.png", "<image>\nWhat is this?", "noise", "plain"),
        _record("good-no-marker", "rgb1.png", "Describe the picture.", "noise", "plain"),
        _record("multi-two", ["rgb0.png", "rgb1.png"], "<image> and <image>: same?", "no", "multi"),
        _record("multi-partial", ["rgb2.png", "rgb3.png", "gray.png"], "Compare <image> with the rest.", "no", "multi"),
        _record("text-only", None, "What is two plus two?", "four", "text"),
        {
            "id": "multi-turn",
            "image": "rgb0.png",
            "conversations": [
                {"from": "human", "value": "<image>\nColour?"},
                {"from": "gpt", "value": "mixed"},
                {"from": "human", "value": "Size?"},
                {"from": "gpt", "value": "small"},
            ],
        },
        {
            "id": "system",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "hello"},
            ],
        },
        _record("gray", "gray.png", "<image>\nShade?", "grey"),
        _record("cmyk", "cmyk.jpg", "<image>\nColour?", "red"),
        _record("sixteen-bit", "sixteen.png", "<image>\nShade?", "grey"),
        _record("rgba", "rgba.png", "<image>\nColour?", "white"),
        _record("la", "la.png", "<image>\nShade?", "light"),
        _record("palette", "palette.png", "<image>\nColour?", "red"),
        _record("exif", "exif.jpg", "<image>\nColour?", "blue"),
        _record("tiny", "tiny.png", "<image>\nColour?", "green"),
        _record("wide", "wide.png", "<image>\nShape?", "a line"),
        _record("unicode", "rgb1.png", "<image>\nΩmega 漢字 🙂 ¿qué?", "ça va 🙂"),
        _record(
            "special-text",
            "rgb2.png",
            "<image>\nIs <|im_end|> or </s> or <|im_start|>assistant a tag?",
            "<|im_end|> yes",
        ),
        _record("nested-dir", "../images/rgb3.png", "<image>\nOk?", "ok"),
    ]
    bad = [
        _record("missing", "nope.png", "<image>\nWhat?"),
        _record("empty", "empty.png", "<image>\nWhat?"),
        _record("truncated", "truncated.png", "<image>\nWhat?"),
        _record("not-an-image", "text.png", "<image>\nWhat?"),
        _record("bomb", "bomb.png", "<image>\nWhat?"),
        _record("outside-relative", "../outside/secret.png", "<image>\nWhat?"),
        _record("outside-absolute", str(root / "outside" / "secret.png"), "<image>\nWhat?"),
        _record("outside-symlink", "link.png", "<image>\nWhat?"),
        _record("too-many-markers", "rgb0.png", "<image> and <image>?"),
        {"id": "no-answer", "image": "rgb0.png", "conversations": [{"from": "human", "value": "<image>\nHm?"}]},
        _record("empty-answer", "rgb0.png", "<image>\nHm?", "  "),
        {"id": "unknown-role", "conversations": [{"from": "robot", "value": "beep"}, {"from": "gpt", "value": "ok"}]},
        {"id": "missing-value", "conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "ok"}]},
        _record("cut-image", "rgb0.png", LONG_TEXT + " <image>"),
        _record("cut-answer", "rgb0.png", "<image>\n" + LONG_TEXT),
    ]
    fillers = [
        _record(f"filler-{k}", f"rgb{k % 4}.png", "<image>\nAgain?", "noise")
        for k in range(NUM_RECORDS - len(good) - len(bad))
    ]
    return good + bad + fillers


def write_corpus(root: Path) -> Path:
    """Everything under `root`; returns `root`."""
    write_images(root)
    records = corpus_records(root)
    assert len(records) == NUM_RECORDS
    (root / "data.json").write_text(json.dumps(records, ensure_ascii=False))
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    (root / "data.jsonl").write_text("\n".join(lines[:5] + ['{"id": "broken", "conversations": [']
                                               + lines[5:]) + "\n")  # fmt: skip
    (root / "val.json").write_text(json.dumps(records[:5], ensure_ascii=False))
    rows = [{"id": r["id"], "images": [] if "image" not in r else r["image"] if isinstance(r["image"], list) else [r["image"]],
             "conversations": r["conversations"]} for r in records]  # fmt: skip
    datasets.Dataset.from_list(rows).save_to_disk(str(root / "hf"))
    return root
