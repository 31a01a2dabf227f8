"""Common conversation layouts (LLaVA `conversations`, the_cauldron `texts`, `{role, content}`) -> our messages.

Images are matched to image markers (`<image>`) and explicit image parts in text order. Where a record
has fewer markers than images (none, or some), the images without a marker go at the start of the
first user turn, in order; more markers than images is a bad sample. `place_images` also returns the
order in which the images appear in the text, which is the order their features fill the placeholders.
"""

from typing import Any

from vlm.data.bad_samples import BadSample

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE = object()  # an explicit image part in a turn (HF {"type": "image"})


def role_of(name: Any, sample: str) -> str:
    if name not in ROLES:
        raise BadSample("malformed_record", f"unknown role {name!r} (known: {', '.join(ROLES)})", sample)
    return ROLES[name]


def text_of(value: Any, what: str, sample: str) -> str:
    if not isinstance(value, str):
        raise BadSample("malformed_record", f"{what} is {value!r}, not a string", sample)
    return value


def llava_turns(conversations: Any, sample: str) -> list[tuple[str, list]]:
    """LLaVA's [{"from": "human"|"gpt"|"system", "value": str}, ...] as (role, parts) turns."""
    if not isinstance(conversations, list):
        raise BadSample("malformed_record", f"conversations is {type(conversations).__name__}, not a list", sample)
    turns = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise BadSample("malformed_record", f"turn {k} is {turn!r}, not a {{from, value}} object", sample)
        turns.append((role_of(turn.get("from"), sample), [text_of(turn.get("value"), f"turn {k}'s value", sample)]))
    return turns


def place_images(
    turns: list[tuple[str, list]], num_images: int, marker: str, sample: str
) -> tuple[list[dict], list[int]]:
    """(role, parts) turns, parts being text (markers inside are images) or IMAGE -> (messages, image order)."""
    messages, marked = [], 0
    for role, parts in turns:
        content = []
        for part in parts:
            if part is IMAGE:
                content.append({"type": "image", "k": marked})
                marked += 1
                continue
            pieces = part.split(marker) if marker else [part]
            for j, piece in enumerate(pieces):
                if j:
                    content.append({"type": "image", "k": marked})
                    marked += 1
                # The newline LLaVA puts between a marker and the text belongs to the marker.
                piece = piece.lstrip("\n") if j else piece
                piece = piece.rstrip("\n") if j < len(pieces) - 1 else piece
                if piece:
                    content.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": content})
    if marked > num_images:
        raise BadSample("marker_mismatch", f"{marked} image marker(s) but {num_images} image(s)", sample)
    if marked < num_images:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise BadSample("malformed_record", f"{num_images - marked} image(s) without a marker and no user turn "
                            "to put them in", sample)  # fmt: skip
        first_user["content"][:0] = [{"type": "image", "k": k} for k in range(marked, num_images)]
    order = [p.pop("k") for m in messages for p in m["content"] if p["type"] == "image"]
    for message in messages:  # plain text stays a string, as in the data format
        if all(p["type"] == "text" for p in message["content"]):
            message["content"] = "".join(p["text"] for p in message["content"])
    return messages, order


def question_sample(images: list, turns: list[str]) -> dict:
    """The raw sample that asks `turns` (user, assistant, ..., user) about `images`, which go before the first
    question in the order given: how `python -m vlm.generate` and the benchmark harness put questions."""
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": str(text)} for i, text in enumerate(turns)]
    messages[0]["content"] = [*({"type": "image"} for _ in images), {"type": "text", "text": messages[0]["content"]}]
    return {"images": list(images), "messages": messages}
