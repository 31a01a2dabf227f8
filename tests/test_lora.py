"""LoRA through peft: only the adapters (and the projector) train, the base stays bitwise, checkpoints hold what
trained and resume exactly onto the same base only, merged == unmerged, and peft loads the exported adapter.

Run: pytest tests/test_lora.py
"""

import json
import math

import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tests.conftest import TINY_VIT, compose_config, make_trainer, new_trainer
from tests.test_accumulation import conversation, gradients_with_micro_batch, run_params
from tests.test_resume import StopAfter, assert_bitwise_equal, losses, params
from vlm import load_pretrained
from vlm.build import build_components, validate_config
from vlm.checkpoint import ResumeMismatchError
from vlm.config import ConfigError
from vlm.data.collate import Collator
from vlm.evaluate import main as evaluate_main
from vlm.export import main as export_main
from vlm.generate import main as generate_main
from vlm.models.lora import is_adapter

LORA = ["train.lora.enabled=true", "train.stage=finetune", "train.lora.r=4", "train.lora.alpha=8"]
RUN = ["train.global_batch_size=4", "train.warmup_steps=0", "train.lr=1e-2", "train.best_metric=null"]


def stored(directory) -> set[str]:
    with safe_open(directory / "model.safetensors", "pt") as weights:
        return set(weights.keys())


def trained_run(run_dir, *adapters: str):
    """A run of 3 steps with these adapter settings: its trainer, its parameters before training, its directory."""
    trainer = make_trainer(run_dir, *adapters, *RUN, "train.max_steps=3")
    before = {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters()}
    trainer.fit()
    return trainer, before, run_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_run(tmp_path_factory.mktemp("lora"), *LORA)


def test_only_the_adapters_and_the_projector_train_and_the_base_stays_bitwise(trained):
    trainer, before, run_dir = trained
    model = trainer.unwrapped
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("lm.") and is_adapter(n) for n in trainable)  # adapters went into the LM
    assert all(is_adapter(n) or n.startswith("projector.") for n in trainable), sorted(trainable)[:5]
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trainable  # every adapter and projector tensor moved; nothing else, bitwise
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper holds the torch optimizer
    assert {id(p) for p in optimizer.state} == {id(p) for p in model.parameters() if p.requires_grad}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["trainable_parameters"] == sum(after[n].numel() for n in trainable)
    assert metrics["frozen_parameters"] > metrics["trainable_parameters"]


def test_checkpoints_hold_what_trained_and_not_the_base(trained):
    trainer, _, run_dir = trained
    model = trainer.unwrapped
    final = run_dir / "checkpoints" / "final"
    buffers = set(model.state_dict()) - {n for n, _ in model.named_parameters(remove_duplicate=False)}
    assert stored(final) == {n for n, p in model.named_parameters() if p.requires_grad} | buffers
    full = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    size = json.loads((run_dir / "metrics.json").read_text())["final_checkpoint_bytes"]
    assert size == (final / "model.safetensors").stat().st_size < full / 2
    assert json.loads((final / "adapter_base.json").read_text())["fingerprint"] == trainer.adapter_base.fingerprint


def test_a_loaded_lora_directory_gives_the_trained_models_logits(trained):
    trainer, _, run_dir = trained
    loaded = load_pretrained(run_dir / "checkpoints" / "final")
    batch = batch_of(trainer.parts, [trainer.parts.val_set[i] for i in range(3)])
    assert torch.equal(logits(loaded.model, batch), logits(trainer.unwrapped, batch))


def batch_of(parts, raws: list[dict]) -> dict:
    return Collator(parts.tokenizer.pad_token_id)([parts.processor(raw, i) for i, raw in enumerate(raws)])


def logits(model, batch: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(batch).logits
    model.train()
    return out


def test_merged_export_equals_the_unmerged_model_and_peft_loads_the_unmerged_adapter(trained, tmp_path):
    trainer, _, run_dir = trained
    final = run_dir / "checkpoints" / "final"
    batch = batch_of(trainer.parts, [trainer.parts.val_set[i] for i in range(3)])
    unmerged = logits(trainer.unwrapped, batch)
    assert export_main([f"checkpoint={final}", f"output_dir={tmp_path / 'merged'}", "merge_lora=true"]) == 0
    merged = load_pretrained(tmp_path / "merged")
    assert not any(is_adapter(n) or "base_layer" in n for n in stored(tmp_path / "merged"))  # a full fine-tune's
    assert torch.allclose(logits(merged.model, batch), unmerged, rtol=1e-5, atol=1e-5)
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "language_model").eval()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    text_only = ids.masked_fill(ids == trainer.unwrapped.token_ids.image, trainer.parts.tokenizer.pad_token_id)
    with torch.no_grad():
        ours = trainer.unwrapped.eval().lm(input_ids=text_only, attention_mask=mask).logits
        assert torch.allclose(lm(input_ids=text_only, attention_mask=mask).logits, ours, rtol=1e-5, atol=1e-5)
        assert export_main([f"checkpoint={final}", f"output_dir={tmp_path / 'apart'}", "merge_lora=false"]) == 0
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "apart" / "language_model")
        with_adapter = PeftModel.from_pretrained(base, tmp_path / "apart" / "lm_adapter").eval()
        assert torch.allclose(with_adapter(input_ids=text_only, attention_mask=mask).logits, ours, rtol=1e-5, atol=1e-5)
    trainer.unwrapped.train()
    assert torch.equal(logits(load_pretrained(tmp_path / "apart").model, batch), unmerged)  # still a LoRA directory


def test_resume_after_a_stop_is_bitwise_and_refuses_another_base(tmp_path):
    run = [*LORA, *RUN, "train.max_steps=6", "train.save_every=2", "train.lora.dropout=0.2"]
    straight = make_trainer(tmp_path / "straight", *run)
    straight.fit()
    cfg = compose_config(*TINY_VIT, *run, "train.eval_every=0", "train.log_every=1")
    assert new_trainer(cfg, tmp_path / "stopped", StopAfter).fit()["stopped_by"] == "SIGTERM"
    with pytest.raises(ResumeMismatchError, match="another base model.*lora-adapters-on-another-base"):
        make_trainer(tmp_path / "stopped", *run, "train.resume=auto", "train.seed=1")  # a randomly drawn base
    resumed = make_trainer(tmp_path / "stopped", *run, "train.resume=auto")
    assert resumed.step == 3
    resumed.fit()
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")  # LoRA dropout's RNG restored too
    assert_bitwise_equal(params(resumed), params(straight))


def test_micro_batch_split_gives_the_adapters_the_same_gradient(tmp_path):
    reference = split_gradients_agree(tmp_path, *LORA)
    assert any(is_adapter(n) for n in reference) and all(is_adapter(n) or n.startswith("projector.") for n in reference)


def split_gradients_agree(run_dir, *adapters: str) -> dict:
    """Asserts that micro-batches of 4 and 1 give one batch of 8's gradients; returns those."""
    trainer = make_trainer(
        run_dir, *adapters, "train.global_batch_size=8", "train.lora.dropout=0"
    )  # masks differ by split
    samples = [trainer.parts.processor(conversation(i, words), i) for i, words in enumerate([1, 12, 2, 30, 1, 7, 3, 9])]
    reference = gradients_with_micro_batch(trainer, samples, 8)
    for micro in (4, 1):
        grads = gradients_with_micro_batch(trainer, samples, micro)
        for name, grad in grads.items():
            scale = reference[name].abs().max().clamp_min(1e-12)
            assert ((grad - reference[name]).abs().max() / scale) < 1e-6, (micro, name)
    return reference


def recomputed_gradients_agree(run_dir, *adapters: str) -> None:
    """Asserts that activation checkpointing gives the adapters the gradients of a run without it."""
    exact = [*adapters, "train.global_batch_size=4", "train.lora.dropout=0"]
    plain = make_trainer(run_dir / "plain", *exact)
    recomputed = make_trainer(run_dir / "recomputed", *exact, "train.activation_checkpointing=true")
    samples = [plain.parts.processor(conversation(i, words), i) for i, words in enumerate([1, 12, 2, 30])]
    reference = gradients_with_micro_batch(plain, samples, 4)
    grads = gradients_with_micro_batch(recomputed, samples, 4)
    assert grads.keys() == reference.keys() and any(is_adapter(n) for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lora.target_modules=[nope]"], "target_modules=\\['nope'\\] matches no module.*q_proj"),
        (["train.lora.target_regex=nothing.*"], "target_regex='nothing.\\*' matches no module"),
        (["train.lora.modules_to_save=[projectr]"], "modules_to_save names 'projectr'"),
        (["train.stage=align"], "train.stage=align: align trains the projector alone"),
    ],
)
def test_lora_settings_that_cannot_work_fail_at_start_up_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_components(validate_config(compose_config(*TINY_VIT, *LORA, *overrides)))


def test_activation_checkpointing_gives_the_same_adapter_gradient_and_bf16_keeps_the_base(tmp_path):
    recomputed_gradients_agree(tmp_path, *LORA)
    bf16 = make_trainer(tmp_path / "bf16", *LORA, *RUN, "train.max_steps=2", "train.mixed_precision=bf16")
    before = {n: p.detach().clone() for n, p in bf16.unwrapped.named_parameters()}
    metrics = bf16.fit()
    assert math.isfinite(metrics["final_train_loss"])
    after = dict(bf16.unwrapped.named_parameters())
    assert {n for n in before if not torch.equal(before[n], after[n])} == {
        n for n, p in after.items() if p.requires_grad
    }


def test_a_lora_stage_starts_from_an_aligned_checkpoint_and_reloads_onto_it(tmp_path):
    """align (projector only, no LoRA) -> LoRA finetune with train.init_from: the adapters go onto the aligned
    weights, and loading the LoRA result rebuilds that base from init_from. A LoRA directory cannot seed a run."""
    aligned = make_trainer(tmp_path / "align", *RUN, "train.stage=align", "train.max_steps=2")
    aligned.fit()
    start = tmp_path / "align" / "checkpoints" / "final"
    lora = make_trainer(tmp_path / "lora", *LORA, *RUN, "train.max_steps=2", f"train.init_from={start}")
    projector = dict(lora.unwrapped.projector.named_parameters())
    for name, param in aligned.unwrapped.projector.named_parameters():
        assert torch.equal(projector[name], param)  # the aligned projector, not a fresh one
    lora.fit()
    final = tmp_path / "lora" / "checkpoints" / "final"
    batch = batch_of(lora.parts, [lora.parts.val_set[i] for i in range(2)])
    assert torch.equal(logits(load_pretrained(final).model, batch), logits(lora.unwrapped, batch))
    with pytest.raises(ResumeMismatchError, match="holds LoRA adapters, not a whole model.*merge_lora=true"):
        make_trainer(tmp_path / "again", *LORA, *RUN, f"train.init_from={final}")


def test_generate_and_evaluate_take_a_lora_directory(trained, tmp_path, capsys):
    trainer, _, run_dir = trained
    final = run_dir / "checkpoints" / "final"
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (220, 20, 20)).save(image)
    assert generate_main([f"checkpoint={final}", f"image={image}", "prompt=What colour?", "max_new_tokens=3"]) == 0
    assert evaluate_main([f"checkpoint={final}", f"output_dir={tmp_path}", "max_new_tokens=3"]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    expected = json.loads((run_dir / "metrics.json").read_text())["val_loss"]  # the run's own final evaluation
    assert report["val_loss"] == pytest.approx(expected, rel=1e-5)


def test_vision_adapters_train_the_tower_through_its_adapters_only():
    from vlm.training.optim import apply_trainable, param_settings

    run = validate_config(compose_config(*TINY_VIT, *LORA, "train.lora.vision=true", "train.stage=full"))
    model = build_components(run).model
    apply_trainable(model, param_settings(model, run.train))
    vision = {n for n, p in model.named_parameters() if n.startswith("vision.") and p.requires_grad}
    adapted = {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n in vision if ".lora_A." in n}
    assert adapted == {"qkv", "proj", "fc1", "fc2"} and all(is_adapter(n) for n in vision)
    assert not any("patch_embed" in n for n in vision)  # attn.proj, not the patch embedding's convolution


def test_the_out_of_memory_back_off_leaves_the_lora_run_unchanged(tmp_path):
    exact = [*LORA, "train.lora.dropout=0"]  # the masks would differ between micro-batch splits
    reference, _, initial = run_params(tmp_path / "plain", *exact)
    params, metrics, _ = run_params(
        tmp_path / "oom", *exact, "train.simulate_oom_above=3", "train.simulate_oom_in=backward"
    )
    assert metrics["oom_back_offs"] == 2 and metrics["micro_batch_size"] == 2
    adapters = [n for n in reference if is_adapter(n)]
    assert torch.cat([(params[n] - initial[n]).flatten() for n in adapters]).norm() > 0  # the adapters trained
    difference = torch.cat([(params[n] - reference[n]).flatten() for n in reference]).norm()
    assert difference / torch.cat([p.flatten() for p in reference.values()]).norm() < 1e-6
