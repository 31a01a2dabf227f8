"""Each workaround of vlm/compat.py is still needed, or its version gate is right: a test here fails on the day a
dependency no longer needs the workaround, so it can go. (The inductor graph-cache patch is shown to be needed in
tests/test_packing.py, where its reproduction compiles anyway.)

Run: pytest tests/test_compat.py
"""

import glob
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from tests.test_distributed import free_port
from vlm.compat import (
    enable_lm_activation_checkpointing,
    encode_plain_text,
    is_out_of_memory,
    keep_4bit_layout,
    safetensors_device,
)
from vlm.data.tokenizer import TokenizerConfig, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_a_failed_cpu_allocation_is_a_runtime_error_not_out_of_memory():
    with pytest.raises(RuntimeError) as failed:
        torch.empty(2**50, dtype=torch.uint8)  # a pebibyte: refused at once, nothing is touched
    assert not isinstance(failed.value, torch.OutOfMemoryError)  # what makes the message test necessary
    assert is_out_of_memory(failed.value)


def test_safetensors_refuses_the_indexed_cpu_device(tmp_path):
    module = torch.nn.Linear(2, 2)
    save_model(module, str(tmp_path / "m.safetensors"))
    with pytest.raises(SafetensorError, match="cpu:0"):
        load_model(module, str(tmp_path / "m.safetensors"), device="cpu:0")
    load_model(module, str(tmp_path / "m.safetensors"), device=safetensors_device("cpu:0"))


def test_activation_checkpointing_takes_the_current_name_without_a_warning():
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    lm = transformers.LlamaForCausalLM(config)
    renamed = Version(transformers.__version__).release >= (5, 23)
    assert hasattr(lm, "activation_checkpointing_enable") == renamed  # the feature gate matches the release
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the deprecated alias would warn
        enable_lm_activation_checkpointing(lm)
    assert lm.is_activation_checkpointing if renamed else lm.is_gradient_checkpointing


def test_plain_text_encoding_equals_split_special_tokens_and_transformers_resets_the_flag():
    corpus = ["What colour is the circle?", "red", "Is the <image> token text?"] * 20
    tokenizer = build_tokenizer(TokenizerConfig(vocab_size=300), corpus, ["<|im_start|>", "<|im_end|>"])
    texts = ["plain words", "a literal <image> in text", "<|im_end|> typed by a user", "ünïcode ✓ <|im_start|>"]
    for text in texts:
        tokenizer(text, add_special_tokens=False)  # transformers' default call leaves the backend flag off
        ours = encode_plain_text(tokenizer, text)
        assert ours == tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"], text
    # The flag our call leaves on the backend does not leak into transformers' own calls.
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert tokenizer("<image>", add_special_tokens=False)["input_ids"] == [image_id]


def test_wandb_offline_tables_still_lose_their_images(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(mode="offline", dir=str(tmp_path), project="compat")
    table = wandb.Table(columns=["image"])
    table.add_data(wandb.Image(np.zeros((8, 8, 3), np.uint8)))
    run.log({"table": table})
    files = run.dir
    run.finish()
    (written,) = glob.glob(f"{files}/media/table/*.table.json")
    assert json.loads(Path(written).read_text())["data"][0][0] == "Image"  # the picture itself is not there


# accelerate's loading from process 0, on one gloo process: a BatchNorm's running statistics stay plain tensors.
LOAD_BUFFERS_PROBE = """
import os, sys, types
import torch, torch.distributed as dist
from accelerate.utils.fsdp_utils import fsdp2_load_full_state_dict
from torch.distributed.fsdp import fully_shard
from vlm.compat import _load_full_state_dict
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo")
for load in (fsdp2_load_full_state_dict, _load_full_state_dict):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    model[1].running_mean.fill_(0.5)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    model = fully_shard(model.to("meta"))
    try:
        load(types.SimpleNamespace(is_main_process=True, device=torch.device("cpu")), model, full)
        print(load.__module__, float(model[1].running_mean[0]), float(model[0].weight.full_tensor()[0, 0, 0, 0] == full["0.weight"][0, 0, 0, 0]))
    except AttributeError as err:
        print(load.__module__, "AttributeError", err)
dist.destroy_process_group()
"""


def test_accelerate_cannot_load_unsharded_buffers_from_process_0():
    """vlm.compat.load_unsharded_buffers_from_process_0 is needed while accelerate's own loader fails on buffers."""
    command = [sys.executable, "-c", LOAD_BUFFERS_PROBE, str(free_port())]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    theirs, ours = done.stdout.splitlines()
    assert theirs == "accelerate.utils.fsdp_utils AttributeError 'Tensor' object has no attribute 'device_mesh'"
    assert ours == "vlm.compat 0.5 1.0"  # the buffer and the parameter shard loaded


# Each process writes its own file: two processes printing to one pipe can interleave within a line.
FSDP_ON_CPU_PROBE = """
import sys
from pathlib import Path
from accelerate import Accelerator
accelerator = Accelerator(cpu=True)
seen = f"{accelerator.num_processes} {accelerator.distributed_type}"
Path(sys.argv[1], f"rank{accelerator.process_index}.txt").write_text(seen)
"""


def test_accelerate_leaves_a_cpu_fsdp_launch_without_fsdp(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(FSDP_ON_CPU_PROBE)
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(probe), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-2000:]
    seen = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)]
    assert seen == ["2 DistributedType.MULTI_CPU"] * 2  # two processes, and no FSDP


def test_bitsandbytes_repacks_4bit_weights_for_its_cpu_inference_kernel():
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn.modules import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks only on CPUs with AVX512-BF16")
    x = torch.randn(2, 64)
    for keep, repacked in [(False, True), (True, False)]:
        layer = bnb.nn.Linear4bit(64, 64, quant_type="nf4").to("cpu")  # quantized
        if keep:
            keep_4bit_layout(layer)
        with torch.no_grad():
            layer.eval()(x)
        assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False) == repacked
