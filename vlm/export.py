"""Export a trained model: `python -m vlm.export checkpoint=PATH output_dir=DIR`.

DIR loads with `VisionLanguageModel.from_pretrained(DIR)` (or `vlm.load_pretrained`), and DIR/language_model/
holds the language model alone in transformers format, with the tokenizer, for
`AutoModelForCausalLM.from_pretrained(DIR/language_model)`. Arguments are `key=value`, as for train.py.
"""

import sys
from pathlib import Path

from vlm.cli import UsageError, parse_args
from vlm.pretrained import export_language_model, load_pretrained

USAGE = "usage: python -m vlm.export checkpoint=PATH output_dir=DIR"


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv, {"checkpoint", "output_dir"}, {"checkpoint", "output_dir"})
    except UsageError as err:
        print(f"{err}\n{USAGE}", file=sys.stderr)
        return 2
    checkpoint, output = Path(args.checkpoint), Path(args.output_dir)
    if not (checkpoint / "model.safetensors").is_file():
        print(f"checkpoint={checkpoint} has no model.safetensors: give a checkpoints/final or step_* directory",
              file=sys.stderr)  # fmt: skip
        return 2
    loaded = load_pretrained(checkpoint)
    loaded.save_pretrained(output)
    export_language_model(output / "language_model", loaded.model, loaded.tokenizer)
    print(f"exported {checkpoint} -> {output} (vlm) and {output / 'language_model'} (transformers)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
