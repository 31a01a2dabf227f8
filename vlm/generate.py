"""Ask a trained model: `python -m vlm.generate checkpoint=PATH image=FILE prompt="What colour is the square?"`.

Arguments are `key=value`, as for train.py:
  checkpoint=DIR                 a checkpoint or exported directory (model.safetensors, config.yaml, tokenizer/)
  image=FILE | images=[A,B]      images, placed before the first question in order (none: a text-only prompt)
  prompt="..." | turns=[Q1,A1,Q2]  one question, or a conversation alternating user/assistant that ends with the user
  max_new_tokens=64 temperature=0 (greedy) top_k= top_p= repetition_penalty=1.0 device=auto
  stop_strings=[".", "\n"]        the answer ends before the first of these
The answer is printed as it is generated (with stop strings: once it is complete, cut before the stop string).
"""

import sys
from dataclasses import fields

from transformers import TextStreamer

from vlm.cli import UsageError, command, parse_args, resolve_device
from vlm.data.bad_samples import BadSample
from vlm.data.conversation import question_sample
from vlm.generation import GenerationSettings, generate_answers
from vlm.pretrained import load_pretrained

SETTINGS = {f.name for f in fields(GenerationSettings)}
KEYS = {"checkpoint", "image", "images", "prompt", "turns", "device"} | SETTINGS


def conversation(args) -> dict:
    """The raw sample of the dataset contract (vlm/data/formats.py) for these arguments."""
    images = [args.image] if "image" in args else list(args.get("images", []))
    turns = [args.prompt] if "prompt" in args else list(args.get("turns", []))
    if not turns or len(turns) % 2 == 0:
        raise UsageError(
            'give prompt="..." or turns=[question, answer, ..., question] (an odd number, ending with a question)'
        )
    return question_sample([str(path) for path in images], turns)


@command(__doc__)
def main(argv: list[str]) -> int:
    args = parse_args(argv, KEYS, {"checkpoint"})
    sample = conversation(args)
    device = resolve_device(args.get("device", "auto"))
    loaded = load_pretrained(args.checkpoint, device)
    settings = GenerationSettings(**{k: args[k] for k in SETTINGS if k in args})
    try:
        prompt = loaded.processor.encode_prompt(sample, 0)
    except BadSample as err:  # an unreadable image, say: named, with its TROUBLESHOOTING entry
        print(err, file=sys.stderr)
        return 1
    streamer = None if settings.stop_strings else TextStreamer(loaded.tokenizer, skip_special_tokens=True)
    answers = generate_answers(loaded.model.eval(), loaded.tokenizer, [prompt], settings, device, streamer=streamer)
    if streamer is None:
        print(answers[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
