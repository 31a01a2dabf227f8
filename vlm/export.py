"""Export a trained model: `python -m vlm.export checkpoint=PATH output_dir=DIR`.

DIR loads with `VisionLanguageModel.from_pretrained(DIR)` (or `vlm.load_pretrained`), and DIR/language_model/
holds the language model alone in transformers format, with the tokenizer, for
`AutoModelForCausalLM.from_pretrained(DIR/language_model)`. Arguments are `key=value`, as for train.py.

A LoRA run's checkpoint: `merge_lora=true` (the default) adds the adapters into the weights, so DIR is laid out as a
full fine-tune's. `merge_lora=false` keeps them apart: DIR is a LoRA directory (adapters and what trained fully,
the base rebuilt from its sources on loading), DIR/language_model/ the LM without adapters, and DIR/lm_adapter/ the
LM's adapter in peft's format, for `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
DIR/language_model), DIR/lm_adapter)`.
"""

import sys
from pathlib import Path

from vlm.checkpoint import EXPORTED_LM, export_language_model
from vlm.cli import UsageError, command, parse_args
from vlm.models.lora import remove_adapters, save_lm_adapter
from vlm.pretrained import load_pretrained

USAGE = "usage: python -m vlm.export checkpoint=PATH output_dir=DIR [merge_lora=true|false]"
LM_ADAPTER = "lm_adapter"


@command(USAGE)
def main(argv: list[str]) -> int:
    args = parse_args(argv, {"checkpoint", "output_dir", "merge_lora"}, {"checkpoint", "output_dir"})
    checkpoint, output = Path(args.checkpoint), Path(args.output_dir)
    merge = args.get("merge_lora", True)
    if not isinstance(merge, bool):
        raise UsageError(f"merge_lora={merge!r}: true or false")
    loaded = load_pretrained(checkpoint)  # a path that is no model directory: a message naming those under it
    adapters = ""
    if loaded.adapter_base is not None and merge:
        remove_adapters(loaded.model, merge=True)
        loaded.adapter_base = None
        loaded.config.train.lora.enabled = False  # the directory holds a plain model now, unquantized
        loaded.config.train.lora.quantize_base = None
        adapters = " with the LoRA adapters merged"
    loaded.save_pretrained(output)
    if loaded.adapter_base is not None:
        save_lm_adapter(loaded.model, output / LM_ADAPTER)
        remove_adapters(loaded.model, merge=False)
        adapters = f"; the LM's adapter in peft's format -> {output / LM_ADAPTER}"
    export_language_model(output / EXPORTED_LM, loaded.model, loaded.tokenizer)
    print(f"exported {checkpoint} -> {output} (vlm) and {output / EXPORTED_LM} (transformers){adapters}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
