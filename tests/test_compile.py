"""torch.compile: full graphs, no recompiles over batch and sequence sizes, compiled == eager, clean checkpoints.

Compiling takes tens of seconds on a small CPU, so each mode compiles once (module fixture) and the tests share it.
Run: pytest tests/test_compile.py
"""

import copy
import math
import random

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from tests.conftest import TINY_VIT, compose_config
from vlm.build import build_components, validate_config
from vlm.compile_policy import apply_compile, mode_for_device, vision_blocks
from vlm.data.collate import Collator
from vlm.debug.synthetic import synthetic_batch
from vlm.pretrained import load_pretrained, save_pretrained

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# The shapes ConvNet (resnet10t) as well as a ViT: CPU convolutions choose their backend by image count,
# which a compiled core must not guard on.
# regional-convnet is the default experiment's combination (resnet10t tower, regional compile).
# LoRA: peft's adapter layers in every LM block, compiled the same way (no LoRA dropout: compiled and eager would
# draw different masks; train_debug.py checks the recipes' dropout for graph breaks and recompiles).
LORA = [*TINY_VIT, "train.lora.enabled=true", "train.stage=finetune", "train.lora.r=4", "train.lora.dropout=0"]


@pytest.fixture(scope="module", params=[("core", TINY_VIT), ("regional", TINY_VIT), ("core", []), ("regional", []),
                                        ("core", LORA), ("regional", LORA)],
                ids=["core-vit", "regional-vit", "core-convnet", "regional-convnet", "core-lora", "regional-lora"])  # fmt: skip
def compiled(request):
    mode, vision = request.param
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    parts = build_components(validate_config(compose_config(*vision)))
    eager = copy.deepcopy(parts.model)
    apply_compile(parts.model, mode)
    return mode, parts, eager, vision


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_varying_batch_and_sequence_cause_no_recompiles_after_warm_up(compiled):
    _, parts, _, _ = compiled
    model, generator = parts.model, torch.Generator().manual_seed(0)
    rng = random.Random(0)
    # Warm-up: the extremes (CPU inductor picks a different sum kernel above 4096 elements: one guard on B*T), and
    # a batch without padding (transformers then gives regional LM blocks no mask: one more graph per block).
    for batch_size, seq_len, padded in [(2, 32, True), (16, 512, True), (2, 32, False)]:
        model(synthetic_batch(model, batch_size, seq_len, generator, padded=padded)).loss_sum.backward()
    after_warm_up = unique_graphs()
    assert after_warm_up > 0 and counters["stats"]["calls_captured"] > 0  # something really was compiled
    for _ in range(20):
        batch = synthetic_batch(model, rng.randint(2, 16), rng.randint(32, 512), generator)
        model(batch).loss_sum.backward()
    assert unique_graphs() == after_warm_up


def test_compiled_and_eager_agree_on_loss_and_gradients(compiled):
    _, parts, eager, _ = compiled
    model = parts.model
    batch = synthetic_batch(model, 4, 96, torch.Generator().manual_seed(1))
    for m in (model, eager):
        m.zero_grad(set_to_none=True)
        m(batch).loss_sum.backward()
    assert torch.allclose(model(batch).loss_sum, eager(batch).loss_sum, rtol=1e-5)
    assert unique_graphs() > 0  # compiled == eager means nothing if nothing compiled
    for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        if q.grad is None:  # frozen under LoRA adapters
            assert p.grad is None, name
            continue
        scale = q.grad.abs().max().clamp_min(1e-12)
        assert (p.grad - q.grad).abs().max() / scale < 1e-4, name


def test_checkpoints_of_compiled_models_have_plain_names_and_reload(compiled, tmp_path):
    mode, parts, _, vision = compiled
    model = parts.model
    assert not [k for k in model.state_dict() if "_orig_mod" in k]
    save_pretrained(tmp_path, model, parts.tokenizer, compose_config(*vision, f"train.compile={mode}"))
    assert not [k for k in load_file(tmp_path / "model.safetensors") if "_orig_mod" in k]
    loaded = load_pretrained(tmp_path)
    apply_compile(loaded.model, mode)  # loading into a compiled model works the same
    raws = [parts.val_set[i] for i in range(3)]
    batch = Collator(parts.tokenizer.pad_token_id)([parts.processor(r, i) for i, r in enumerate(raws)])
    model.eval(), loaded.model.eval()
    with torch.enable_grad():  # the compiled path; without gradients regional blocks run eagerly
        assert torch.allclose(model(batch).logits, loaded.model(batch).logits, atol=1e-5)
    model.train()


def test_trainer_with_regional_compile_trains_evaluates_and_saves(tmp_path):
    from tests.conftest import make_trainer

    torch._dynamo.reset()
    counters.clear()
    trainer = make_trainer(tmp_path, "train.compile=regional", "train.max_steps=2", "train.global_batch_size=4")
    metrics = trainer.fit()  # evaluation generates with the blocks' eager path (no gradients, KV cache)
    assert unique_graphs() > 0
    assert math.isfinite(metrics["final_train_loss"])
    assert not [k for k in load_file(tmp_path / "checkpoints" / "final" / "model.safetensors") if "_orig_mod" in k]


def test_cpu_compile_without_a_cpp_compiler_falls_back_to_eager_with_a_warning(caplog):
    no_compiler = torch._inductor.config.patch({"cpp.cxx": ("no-such-c++-compiler",)})
    with no_compiler, caplog.at_level("WARNING", logger="vlm.compile_policy"):
        assert mode_for_device("regional", torch.device("cpu")) == "off"
        assert mode_for_device("regionl", torch.device("cpu")) == "regionl"  # left for apply_compile's error
        assert mode_for_device("regional", torch.device("cuda")) == "regional"  # GPU kernels need no C++ compiler
    assert "train.compile=regional" in caplog.text and "TROUBLESHOOTING.md#no-c-compiler-for-cpu-compile" in caplog.text
    with pytest.MonkeyPatch.context() as found:  # a machine with a compiler keeps the mode (whatever this one has)
        found.setattr("vlm.compile_policy.missing_cpu_compiler", lambda: None)
        assert mode_for_device("core", torch.device("cpu")) == "core"


def compiled_code(function) -> bool:
    """Whether dynamo holds a compiled graph for this function's code: asked of torch, not of our bookkeeping."""
    return bool(torch._dynamo.eval_frame._debug_get_cache_entry_list(function.__code__))


@pytest.mark.parametrize(
    "tower, vision, found",
    [("vit", TINY_VIT, {"vision_blocks": 2}), ("resnet-stage-2", ["model.vision.feature_layer=2"], {"vision_blocks": 2}),
     ("resnet-stem", [], {"vision_tower": 1})],
)  # fmt: skip
def test_regional_compile_compiles_every_part_that_runs(tower, vision, found):
    """Per part, what regional compile found and what dynamo really compiled in a training step: the ViT's blocks,
    the blocks of the ResNet layers its feature layer keeps (timm prunes the later ones to empty containers), or the
    whole tower when it runs no block (the shapes ResNet takes its stem); and every LM layer."""
    torch._dynamo.reset()
    model = build_components(validate_config(compose_config(*vision))).model
    assert apply_compile(model, "regional") == {**found, "lm_layers": model.lm.config.num_hidden_layers}
    model(synthetic_batch(model, 2, 64, torch.Generator().manual_seed(0))).loss_sum.backward()
    backbone = model.vision.backbone
    compiled_part = {"vit": lambda: backbone.blocks[0], "resnet-stage-2": lambda: backbone.layer2[0],
                     "resnet-stem": lambda: model.vision}[tower]()  # fmt: skip
    assert compiled_code(type(compiled_part).forward) and compiled_code(type(model.lm.base_model.layers[0]).forward)


def test_a_convnet_with_stages_has_its_stages_found():
    backbone = timm.create_model("convnext_atto", pretrained=False)
    assert vision_blocks(backbone) == list(backbone.stages) and len(backbone.stages) == 4
