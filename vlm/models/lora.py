"""LoRA adapters on the LM (and optionally the vision tower), through peft.

peft injects its LoRA layers in place (`inject_adapter_in_model`): the model keeps its class and attributes, each
adapted linear layer becomes a peft `LoraLayer` holding the frozen `base_layer` and the trainable `lora_A`/`lora_B`.
Parameter names change accordingly (`lm.model.layers.0.self_attn.q_proj.weight` becomes
`...q_proj.base_layer.weight`, next to `...q_proj.lora_A.default.weight`), so adapters are added after the base has
its weights (vlm/build.py: pretrained, then `train.init_from`), and merging gives the plain
model back (`remove_adapters`), whose weights save under the usual names.

QLoRA (`quantize_base`): before the adapters go on, the LM's linear layers become bitsandbytes' 4-bit or 8-bit
layers, quantized from the weights the base has then; merging dequantizes them first.

What trains with LoRA is decided in vlm/training/optim.py: the adapters, the `modules_to_save`, and the modules
the stage trains that LoRA does not adapt (the projector); the adapted modules' own weights stay frozen.
"""

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from packaging.version import Version
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.integrations import dequantize_bnb_weight
from safetensors.torch import save_file
from torch import nn

from vlm.checkpoint import AdapterBase
from vlm.compat import keep_4bit_layout
from vlm.config import ConfigError

ADAPTER = "default"  # peft's adapter name; one adapter per model
QUANTIZED_BASES = ("4bit", "8bit")
BITSANDBYTES = "0.50"  # the oldest release we run QLoRA with: its CPU kernels run the tests
# The vision towers' linear layers by their timm names: attention (qkv, attn.proj) and MLP (fc1, fc2) of ViT-style
# blocks; `attn.proj`, not `proj`, which would also match the patch embedding's convolution.
VISION_TARGETS = ["qkv", "attn.proj", "fc1", "fc2"]


@dataclass
class LoraSettings:
    """`train.lora`. `target_modules`: module names, each matching a whole name or its last part (peft's rule), or
    `all-linear` (the default): every linear layer of the LM but its output head, i.e. the attention and MLP
    projections. `target_regex`: instead, one regex that must match a module's whole name (under `lm.`)."""

    enabled: bool = False
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    target_regex: str | None = None
    vision: bool = False  # also adapt the vision tower's `vision_target_modules`
    vision_target_modules: list[str] = field(default_factory=lambda: list(VISION_TARGETS))
    modules_to_save: list[str] = field(default_factory=lambda: ["projector"])  # trained fully, by module name
    init: bool | str = True  # peft's init_lora_weights: true (B = 0), gaussian, pissa, olora, ...
    quantize_base: str | None = None  # 4bit | 8bit: QLoRA, the LM's base weights quantized by bitsandbytes


def check_lora_settings(lora: LoraSettings) -> None:
    """What can be told before any model is built."""
    if not lora.enabled:
        if lora.quantize_base is not None:
            raise ConfigError(
                f"train.lora.quantize_base={lora.quantize_base} quantizes the base under LoRA adapters (QLoRA): set "
                "train.lora.enabled=true too, or train.lora.quantize_base=null"
            )
        return
    if lora.r < 1:
        raise ConfigError(f"train.lora.r={lora.r} must be >= 1")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"train.lora.dropout={lora.dropout} must be in [0, 1)")
    if lora.quantize_base is not None:
        if lora.quantize_base not in QUANTIZED_BASES:
            raise ConfigError(f"train.lora.quantize_base={lora.quantize_base!r} is not one of: 4bit, 8bit, null")
        import_bitsandbytes(f"train.lora.quantize_base={lora.quantize_base}")


def import_bitsandbytes(key: str):
    """bitsandbytes, in a release whose CPU kernels we test QLoRA with; a ConfigError naming `key` otherwise."""
    try:
        import bitsandbytes
    except ImportError:
        found = None
    else:
        found = bitsandbytes.__version__
    if found is None or Version(found) < Version(BITSANDBYTES):
        have = "is not installed" if found is None else f"is {found}"
        raise ConfigError(
            f"{key} (QLoRA) quantizes with bitsandbytes>={BITSANDBYTES}, which {have} here: pip install -e '.[qlora]'. "
            "See TROUBLESHOOTING.md#qlora-needs-bitsandbytes."
        )
    return bitsandbytes


def add_adapters(model: nn.Module, lora: LoraSettings) -> None:
    """LoRA layers in `model.lm` (and `model.vision.backbone` with `lora.vision`), in place; with
    `lora.quantize_base` (QLoRA) the LM's base layers are quantized first."""
    if lora.quantize_base is not None:
        quantize_linear_layers(model.lm, lora.quantize_base)
    if lora.target_regex is not None:
        _inject(model.lm, lora, lora.target_regex, "train.lora.target_regex")
    else:
        _inject(model.lm, lora, _peft_targets(lora.target_modules), "train.lora.target_modules")
    if lora.vision:
        _inject(model.vision.backbone, lora, list(lora.vision_target_modules), "train.lora.vision_target_modules")
    names = [name for name, _ in model.named_parameters()]
    for prefix in lora.modules_to_save:
        if not any(in_module(name, [prefix]) for name in names):
            raise ConfigError(
                f"train.lora.modules_to_save names {prefix!r}, which holds no parameter of the model (top-level "
                f"modules: {sorted({n.split('.', 1)[0] for n in names})}). See TROUBLESHOOTING.md#lora-target-modules."
            )


def quantize_linear_layers(lm: nn.Module, bits: str) -> None:
    """QLoRA's base: each linear layer of the LM but its output head becomes a frozen bitsandbytes layer, quantized
    here, on the CPU where the model is built (every device and process then holds the same quantized base). 4bit is
    NF4 with double-quantized statistics (the QLoRA paper's choice), 8bit is LLM.int8(). The embeddings, the norms
    and the output head stay as they are, as transformers leaves them when it loads a model in 4 or 8 bits."""
    bnb = import_bitsandbytes(f"train.lora.quantize_base={bits}")
    head = lm.get_output_embeddings()
    linear = [(name, m) for name, m in lm.named_modules() if type(m) is nn.Linear and m is not head]
    for name, module in linear:
        _replace(lm, name, _quantized(bnb, module, bits))
    setattr(lm, f"is_loaded_in_{bits}", True)  # transformers' mark of a quantized model: peft then wraps bnb layers


def _quantized(bnb, linear: nn.Linear, bits: str) -> nn.Module:
    shape, bias = (linear.in_features, linear.out_features), linear.bias is not None
    weight = linear.weight.detach()
    if bits == "4bit":
        layer = bnb.nn.Linear4bit(*shape, bias, quant_type="nf4", compress_statistics=True, device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", module=layer)
        keep_4bit_layout(layer)  # training after an evaluation must see the same weights
    else:
        layer = bnb.nn.Linear8bitLt(*shape, bias, has_fp16_weights=False, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return layer.to(weight.device)  # bitsandbytes quantizes a weight when it is first moved to a device


def is_quantized(layer: nn.Module) -> bool:
    """A bitsandbytes linear layer (not peft's adapter layer around one, which shows its base's weight)."""
    return isinstance(layer, nn.Linear) and type(layer.weight).__name__ in ("Params4bit", "Int8Params")


def weight_count(param: torch.Tensor) -> int:
    """The values a parameter holds: a 4-bit weight packs two in each byte of its storage."""
    state = getattr(param, "quant_state", None)
    return state.shape.numel() if state is not None else param.numel()


def dequantized(layer: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A plain linear layer holding a quantized layer's weights dequantized: what the quantized layer computes."""
    plain = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
    weight = dequantize_bnb_weight(layer.weight, state=getattr(layer, "state", None))
    plain.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if layer.bias is not None:
        plain.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
    return plain


def in_module(name: str, prefixes: list[str]) -> bool:
    """Whether parameter `name` belongs to one of the modules named by `prefixes` (`projector`, `lm.lm_head`)."""
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _inject(part: nn.Module, lora: LoraSettings, targets: list[str] | str, key: str) -> None:
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
        init_lora_weights=lora.init, bias="none",
    )  # fmt: skip
    try:
        inject_adapter_in_model(config, part, adapter_name=ADAPTER)
    except ValueError as err:
        if "not found in the base model" not in str(err) and "No modules were targeted" not in str(err):
            raise
        raise ConfigError(
            f"{key}={targets!r} matches no module of the model. Its linear layers are named: "
            f"{', '.join(linear_layer_names(part))}. See TROUBLESHOOTING.md#lora-target-modules."
        ) from None


def _peft_targets(names: list[str]) -> list[str] | str:
    """peft takes "all-linear" as a string of its own, and a list of names otherwise."""
    return "all-linear" if list(names) == ["all-linear"] else list(names)


def linear_layer_names(part: nn.Module) -> list[str]:
    """The distinct last parts of the names of a module's linear layers: the candidates for target_modules."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in part.named_modules() if isinstance(module, nn.Linear)})


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


def is_adapter(name: str) -> bool:
    return ".lora_" in name


def base_fingerprint(model: nn.Module, stored: set[str]) -> str:
    """A hash of the base: every parameter a LoRA checkpoint does not store (`stored`), with its name. Two
    models whose adapters were trained on different bases (another pretrained release, another init_from, another
    seed of a random base) differ here."""
    digest = hashlib.blake2b(digest_size=16)
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if name in stored:
            continue
        tensor = param.detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def remove_adapters(model: nn.Module, merge: bool) -> None:
    """Each LoRA layer replaced by its base layer, with the LoRA update added into it (`merge`, peft's `merge`) or
    dropped: the plain model, under the usual parameter names. A quantized base (QLoRA) is dequantized first, so
    the merged weights compute what the trained model computed (peft would quantize the sum again)."""
    dtype = model.lm.get_input_embeddings().weight.dtype
    adapted = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in adapted:
        base = module.get_base_layer()
        if is_quantized(base):
            base = dequantized(base, dtype)
            if merge:
                base.weight.data += module.get_delta_weight(ADAPTER).to(dtype)
        elif merge:
            module.merge()
        _replace(model, name, base)
    for name, module in [(n, m) for n, m in model.named_modules() if is_quantized(m)]:  # layers LoRA left out
        _replace(model, name, dequantized(module, dtype))


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def save_lm_adapter(model: nn.Module, directory: Path) -> None:
    """The LM's adapter in peft's own format (adapter_config.json, adapter_model.safetensors), which
    `peft.PeftModel.from_pretrained(lm, directory)` loads onto the LM without adapters (an export's
    language_model/). Only the LM's: a vision tower's adapters and the projector stay in the vlm directory."""
    directory.mkdir(parents=True, exist_ok=True)
    model.lm.peft_config[ADAPTER].save_pretrained(str(directory))
    state = get_peft_model_state_dict(model.lm, adapter_name=ADAPTER)
    # PeftModel's own names: the adapted model sits at base_model.model.
    renamed = {f"base_model.model.{name}": tensor.detach().contiguous() for name, tensor in state.items()}
    save_file(renamed, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})


def adapter_base(model: nn.Module) -> AdapterBase:
    """What a LoRA run's checkpoints store (the trainable parameters and every buffer) and the base's fingerprint;
    call it once trainability is set, before the model is compiled or sharded."""
    # Persistent buffers only; not the statistics bitsandbytes adds to a quantized layer's state dict, which the
    # rebuilt (and quantized again) base has.
    buffers = set(model.state_dict()) & {name for name, _ in model.named_buffers(remove_duplicate=False)}
    stored = frozenset({name for name, param in model.named_parameters() if param.requires_grad} | buffers)
    return AdapterBase(stored, base_fingerprint(model, stored))
