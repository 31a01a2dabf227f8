"""Export a trained model: `python -m vlm.export checkpoint=PATH output_dir=DIR`.

DIR loads with `VisionLanguageModel.from_pretrained(DIR)` (or `vlm.load_pretrained`), and DIR/language_model/
holds the language model alone in transformers format, with the tokenizer, for
`AutoModelForCausalLM.from_pretrained(DIR/language_model)`. Arguments are `key=value`, as for train.py.
"""

import sys
from pathlib import Path

from vlm.checkpoint import EXPORTED_LM, export_language_model
from vlm.cli import command, parse_args
from vlm.pretrained import load_pretrained

USAGE = "usage: python -m vlm.export checkpoint=PATH output_dir=DIR"


@command(USAGE)
def main(argv: list[str]) -> int:
    args = parse_args(argv, {"checkpoint", "output_dir"}, {"checkpoint", "output_dir"})
    checkpoint, output = Path(args.checkpoint), Path(args.output_dir)
    loaded = load_pretrained(checkpoint)  # a path that is no model directory: a message naming those under it
    loaded.save_pretrained(output)
    export_language_model(output / EXPORTED_LM, loaded.model, loaded.tokenizer)
    print(f"exported {checkpoint} -> {output} (vlm) and {output / EXPORTED_LM} (transformers)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
