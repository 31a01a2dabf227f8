"""Evaluate a trained model: `python -m vlm.evaluate checkpoint=PATH output_dir=DIR [data overrides]`.

Arguments are `key=value`, as for train.py:
  checkpoint=DIR               a checkpoint or exported directory (model.safetensors, config.yaml, tokenizer/)
  output_dir=DIR               where eval.json and eval.html are written
  max_samples=N                at most N samples of the validation split (default: all of it)
  batch_size=32 max_new_tokens=(the run's train.max_new_tokens) show=100 (predictions on the page) device=auto
  data=llava | data=hf         another data format than the run's, with its data.dataset.* keys
  data.KEY=VALUE               e.g. data.dataset.val_path=test.json (evaluates the whole file)
The validation split is the run's unless overridden; the chat format, tokenizer and image settings are always the
checkpoint's. Validation loss, accuracy (normalised answers) and exact match, per kind where samples have one, go to
eval.json (with every prediction) and eval.html (the table and the samples, wrong ones first).
"""

import copy
import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from vlm.build import build_processor
from vlm.checkpoint import read_model_directory
from vlm.cli import command, parse_args, resolve_device
from vlm.config import CONFIG_DIR, ConfigError
from vlm.data.formats import build_dataset, data_config
from vlm.eval_page import write_eval_page
from vlm.evaluation import evaluate
from vlm.models.vision_language_model import VisionLanguageModel

KEYS = {"checkpoint", "output_dir", "max_samples", "batch_size", "max_new_tokens", "show", "device"}


def with_data_overrides(saved: DictConfig, overrides: list[str]) -> DictConfig:
    """The checkpoint's config with `data=FORMAT` (that format's dataset section, composed as train.py would)
    and `data.*=value` overrides applied."""
    cfg = copy.deepcopy(saved)
    formats = [o for o in overrides if o.startswith("data=")]
    dotted = [o for o in overrides if o.startswith("data.")]
    if formats:
        dataset_keys = [o for o in dotted if o.startswith("data.dataset.")]
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg.data.dataset = compose("config", overrides=[formats[-1], *dataset_keys]).data.dataset
        dotted = [o for o in dotted if o not in dataset_keys]
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotted))


@command(__doc__)
def main(argv: list[str]) -> int:
    data_args = [a for a in argv if a.startswith(("data=", "data."))]
    args = parse_args([a for a in argv if a not in data_args], KEYS, {"checkpoint", "output_dir"})
    device = resolve_device(args.get("device", "auto"))
    saved = read_model_directory(args.checkpoint)
    try:  # the data first: a mistake there is reported before the model is built
        cfg = with_data_overrides(saved.config, data_args)
        data = data_config(cfg)
        val_set = build_dataset(data.dataset, "val", cfg.model.vision.image_size)
    except (ConfigError, HydraException, ValueError) as err:
        print(f"cannot read the data: {err}", file=sys.stderr)
        return 2
    model = VisionLanguageModel.from_saved(saved, device)
    processor = build_processor(model, saved.chat_format, data)  # the checkpoint's chat format, the data's settings
    count = min(int(args.get("max_samples", len(val_set))), len(val_set))
    result = evaluate(
        model, processor, saved.tokenizer, val_set, range(count), int(args.get("batch_size", 32)),
        int(args.get("max_new_tokens", cfg.train.max_new_tokens)), device,
    )  # fmt: skip
    summary = result.summary()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = OmegaConf.to_container(cfg.data.dataset, resolve=True)
    source = OmegaConf.to_yaml({"checkpoint": str(args.checkpoint), "data": {"dataset": dataset}})
    report = {"checkpoint": str(args.checkpoint), "data": dataset, **summary, "predictions": result.predictions}
    (out / "eval.json").write_text(json.dumps(report, indent=2, default=str))
    write_eval_page(out / "eval.html", f"Evaluation of {args.checkpoint}", source, summary, result.predictions,
                    val_set.__getitem__, int(args.get("show", 100)))  # fmt: skip
    print(json.dumps(summary, default=str))
    print(f"wrote {out / 'eval.json'} and {out / 'eval.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
