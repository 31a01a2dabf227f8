"""Models out: save_pretrained / from_pretrained round trip, and the language model exported for transformers alone.

Run: pytest tests/test_export.py
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vlm import VisionLanguageModel, load_pretrained
from vlm.data.collate import Collator
from vlm.export import main as export_main

TEXT_ONLY = {"images": [], "messages": [{"role": "user", "content": "Which shapes are round?"},
                                        {"role": "assistant", "content": "circles"}]}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(saved_model):
    return saved_model[0]


@pytest.fixture(scope="module")
def exported(saved_model, tmp_path_factory):
    saved, out = saved_model[1], tmp_path_factory.mktemp("exported")
    assert export_main([f"checkpoint={saved}", f"output_dir={out}"]) == 0
    return saved, out


def batch_of(processor, tokenizer, raws: list[dict]) -> dict:
    return Collator(tokenizer.pad_token_id)([processor(raw, i) for i, raw in enumerate(raws)])


def test_save_and_load_pretrained_give_identical_logits(tiny, exported):
    saved, out = exported
    raws = [tiny.val_set[i] for i in range(3)] + [TEXT_ONLY]
    batch = batch_of(tiny.processor, tiny.tokenizer, raws)
    tiny.model.eval()
    with torch.no_grad():
        expected = tiny.model(batch).logits
        for directory in (saved, out):
            model = VisionLanguageModel.from_pretrained(directory).eval()
            assert torch.equal(model(batch).logits, expected), directory
    loaded = load_pretrained(out)  # and the processor built from the saved config encodes alike
    assert torch.equal(batch_of(loaded.processor, loaded.tokenizer, raws)["input_ids"], batch["input_ids"])
    tiny.model.train()


def test_exported_language_model_loads_with_transformers_alone(tiny, exported):
    _, out = exported
    lm = AutoModelForCausalLM.from_pretrained(out / "language_model").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "language_model")
    batch = batch_of(tiny.processor, tiny.tokenizer, [TEXT_ONLY])
    assert tokenizer("Which shapes are round?")["input_ids"] == tiny.tokenizer("Which shapes are round?")["input_ids"]
    tiny.model.eval()
    with torch.no_grad():
        ours = tiny.model(batch).logits
        theirs = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    tiny.model.train()
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_export_refuses_a_directory_without_weights(tmp_path, capsys):
    assert export_main([f"checkpoint={tmp_path}", f"output_dir={tmp_path / 'out'}"]) == 2
    assert "no model.safetensors" in capsys.readouterr().err
    assert export_main(["checkpoint=x", "output_dir=y", "outptu=z"]) == 2
