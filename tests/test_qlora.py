"""QLoRA (`train.lora.quantize_base`): the LM's base layers are bitsandbytes' 4-bit (NF4) or 8-bit layers, only the
adapters and the projector train, the quantized base stays bitwise, checkpoints hold no base and resume exactly,
and the export merges into the dequantized base, so it computes what was trained. bitsandbytes >= 0.50 runs these
on the CPU.

Run: pytest tests/test_qlora.py
"""

import json
import sys
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import bnb as peft_bnb
from torch import nn
from transformers import AutoModelForCausalLM

from tests.conftest import TINY_VIT, compose_config, make_trainer, new_trainer
from tests.test_lora import (
    LORA,
    RUN,
    batch_of,
    logits,
    recomputed_gradients_agree,
    split_gradients_agree,
    stored,
    trained_run,
)
from tests.test_resume import StopAfter, assert_bitwise_equal, losses, params
from vlm import load_pretrained
from vlm.build import build_components, validate_config
from vlm.config import ConfigError
from vlm.export import main as export_main
from vlm.models.lora import is_adapter, is_quantized

bnb = pytest.importorskip("bitsandbytes")
QLORA = [*LORA, "train.lora.quantize_base=4bit"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_run(tmp_path_factory.mktemp("qlora"), *QLORA)


def linear_layers(module: nn.Module) -> set[str]:
    """Names of the linear layers of an LM without adapters, the output head left out."""
    head = module.get_output_embeddings()
    return {n for n, m in module.named_modules() if isinstance(m, nn.Linear) and m is not head}


def test_the_lm_is_quantized_and_only_its_adapters_and_the_projector_train(trained):
    trainer, before, run_dir = trained
    model = trainer.unwrapped
    plain_model = build_components(validate_config(compose_config(*TINY_VIT))).model  # the same model, plain
    plain = plain_model.lm
    expected = {f"{name}.base_layer" for name in linear_layers(plain)}  # every one is adapted (all-linear)
    quantized = {n for n, m in model.lm.named_modules() if is_quantized(m)}
    assert quantized == expected and len(quantized) == 7  # q, k, v, o, gate, up, down of its one block
    assert all(isinstance(model.lm.get_submodule(n), bnb.nn.Linear4bit) for n in quantized)
    wrappers = [model.lm.get_submodule(n.removesuffix(".base_layer")) for n in quantized]
    assert all(isinstance(w, peft_bnb.Linear4bit) for w in wrappers)  # peft's layers for a 4-bit base
    assert model.lm.get_output_embeddings().weight.dtype == torch.float32  # the head stays as it is
    base_bytes = sum(model.lm.get_submodule(n).weight.nbytes for n in quantized)
    full_bytes = sum(plain.get_submodule(n.removesuffix(".base_layer")).weight.nbytes for n in quantized)
    assert base_bytes * 8 == full_bytes  # 4 bits a weight, against 32
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("lm.") and is_adapter(n) for n in trainable)
    assert all(is_adapter(n) or n.startswith("projector.") for n in trainable), sorted(trainable)[:5]
    after = dict(model.named_parameters())
    assert {n for n in before if not torch.equal(before[n], after[n])} == trainable  # the 4-bit base: bitwise
    optimizer = trainer.optimizer.optimizer
    assert {id(p) for p in optimizer.state} == {id(p) for p in model.parameters() if p.requires_grad}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["trainable_parameters"] == sum(after[n].numel() for n in trainable)
    adapters = sum(p.numel() for n, p in model.named_parameters() if is_adapter(n))
    total = sum(p.numel() for p in plain_model.parameters()) + adapters  # a 4-bit weight counts its values
    assert metrics["trainable_parameters"] + metrics["frozen_parameters"] == total


def test_checkpoints_hold_no_base_and_reload_onto_the_same_quantized_base(trained):
    trainer, _, run_dir = trained
    model = trainer.unwrapped
    final = run_dir / "checkpoints" / "final"
    persistent = {n for n, _ in model.named_buffers()} & set(model.state_dict())
    assert stored(final) == {n for n, p in model.named_parameters() if p.requires_grad} | persistent
    assert not [n for n in stored(final) if "absmax" in n or "quant_" in n]  # bitsandbytes' statistics stay out
    loaded = load_pretrained(final)  # rebuilt, quantized again, fingerprint checked
    assert {n for n, m in loaded.model.named_modules() if is_quantized(m)}
    batch = batch_of(trainer.parts, [trainer.parts.val_set[i] for i in range(3)])
    assert torch.equal(logits(loaded.model, batch), logits(model, batch))


def test_the_merged_export_computes_what_was_trained(trained, tmp_path):
    trainer, _, run_dir = trained
    final = run_dir / "checkpoints" / "final"
    batch = batch_of(trainer.parts, [trainer.parts.val_set[i] for i in range(3)])
    trained_logits = logits(trainer.unwrapped, batch)
    assert export_main([f"checkpoint={final}", f"output_dir={tmp_path / 'merged'}", "merge_lora=true"]) == 0
    merged = load_pretrained(tmp_path / "merged")
    assert not any(is_quantized(m) for m in merged.model.modules())  # a full fine-tune's layout, full precision
    assert merged.config.train.lora.quantize_base is None
    # Into the dequantized base: merging into the unquantized weights instead would differ by NF4's error.
    assert torch.allclose(logits(merged.model, batch), trained_logits, rtol=1e-5, atol=1e-5)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    text_only = ids.masked_fill(ids == trainer.unwrapped.token_ids.image, trainer.parts.tokenizer.pad_token_id)
    with torch.no_grad():
        ours = trainer.unwrapped.eval().lm(input_ids=text_only, attention_mask=mask).logits
        assert export_main([f"checkpoint={final}", f"output_dir={tmp_path / 'apart'}", "merge_lora=false"]) == 0
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "apart" / "language_model")  # dequantized
        with_adapter = PeftModel.from_pretrained(base, tmp_path / "apart" / "lm_adapter").eval()
        assert torch.allclose(with_adapter(input_ids=text_only, attention_mask=mask).logits, ours, rtol=1e-5, atol=1e-5)
    trainer.unwrapped.train()
    assert torch.equal(logits(load_pretrained(tmp_path / "apart").model, batch), trained_logits)  # still QLoRA


def test_qlora_resume_after_a_stop_is_bitwise(tmp_path):
    run = [*QLORA, *RUN, "train.max_steps=5", "train.save_every=2", "train.lora.dropout=0.2"]
    straight = make_trainer(tmp_path / "straight", *run)
    straight.fit()
    cfg = compose_config(*TINY_VIT, *run, "train.eval_every=0", "train.log_every=1")
    assert new_trainer(cfg, tmp_path / "stopped", StopAfter).fit()["stopped_by"] == "SIGTERM"
    resumed = make_trainer(tmp_path / "stopped", *run, "train.resume=auto")
    assert resumed.step == 3
    resumed.fit()
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")
    assert_bitwise_equal(params(resumed), params(straight))


def test_micro_batch_split_gives_the_adapters_the_same_gradient_through_the_quantized_base(tmp_path):
    reference = split_gradients_agree(tmp_path, *QLORA)
    assert [n for n in reference if is_adapter(n) and ".layers.0." in n]  # through every quantized layer above


def test_activation_checkpointing_gives_the_same_adapter_gradient_through_the_quantized_base(tmp_path):
    recomputed_gradients_agree(tmp_path, *QLORA)


def test_an_8bit_base_trains_its_adapters_stays_bitwise_and_exports_within_int8_rounding(tmp_path):
    trainer = make_trainer(tmp_path, *LORA, *RUN, "train.lora.quantize_base=8bit", "train.max_steps=1")
    model = trainer.unwrapped
    quantized = [m for m in model.lm.modules() if is_quantized(m)]
    assert quantized and all(isinstance(m, bnb.nn.Linear8bitLt) and m.weight.dtype == torch.int8 for m in quantized)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.fit()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad} and changed
    batch = batch_of(trainer.parts, [trainer.parts.val_set[i] for i in range(3)])
    trained_logits = logits(model, batch)
    assert export_main([f"checkpoint={tmp_path / 'checkpoints' / 'final'}", f"output_dir={tmp_path / 'merged'}"]) == 0
    merged = logits(load_pretrained(tmp_path / "merged").model, batch)
    # LLM.int8() rounds the activations too, which no plain model does: close (measured 0.3% of the largest logit),
    # not equal as 4 bits are.
    assert (merged - trained_logits).abs().max() < 0.01 * trained_logits.abs().max()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lora.enabled=false", "train.lora.quantize_base=4bit"], "quantize_base=4bit quantizes the base under"),
        (["train.lora.quantize_base=2bit"], "quantize_base='2bit' is not one of: 4bit, 8bit"),
    ],
)
def test_qlora_settings_that_cannot_work_fail_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_config(*TINY_VIT, *LORA, *overrides))


@pytest.mark.parametrize("installed", [None, "0.45.0"], ids=["missing", "too-old"])
def test_qlora_without_a_bitsandbytes_that_runs_it_names_the_install(monkeypatch, installed):
    if installed is None:
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    else:
        monkeypatch.setattr(bnb, "__version__", installed)
    with pytest.raises(
        ConfigError, match=r"quantize_base=4bit.*bitsandbytes>=0.50.*\.\[qlora\].*qlora-needs-bitsandbytes"
    ):
        validate_config(compose_config(*TINY_VIT, *QLORA))


def test_qlora_under_fsdp_is_refused_before_the_model_is_built():
    from vlm.training.distributed import check_quantized_base

    run = validate_config(compose_config(*TINY_VIT, *QLORA))
    check_quantized_base(run.train.lora, SimpleNamespace(is_fsdp2=False))
    with pytest.raises(ConfigError, match="quantize_base=4bit with FSDP.*ddp.yaml"):
        check_quantized_base(run.train.lora, SimpleNamespace(is_fsdp2=True))
