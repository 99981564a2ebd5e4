"""LoRA: trainable low-rank adapters beside frozen linear layers, and their merge into the weights (docs/finetune.md).

A LoRA layer computes ``y = base(x) + (alpha / r) * B (A x)`` with A (r, in) and B (out, r). A starts as
PyTorch's default ``nn.Linear`` init (Kaiming-uniform, a = sqrt(5)), B at zero, so an adapted model computes
exactly what its base computes until the first step moves B. The base is any frozen linear layer: an fp32
``nn.Linear``, a bf16 or fp8 ``FrozenLinear`` or a bitsandbytes 4-bit layer from ``train/frozen.py``; the adapters
are fp32 parameters whatever the base holds.

Merging adds ``(alpha / r) * B @ A`` (out, in) to a weight. ``train/finetune.py`` adds it to the fp32 weight read
from the stack file, never to the frozen (rounded or quantised) copy the adapters trained against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stackwise_cli.errors import StackwiseError


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a frozen linear layer of ``train/frozen.py`` (which carry ``dequantized_weight``)."""
    return isinstance(module, nn.Linear) or hasattr(module, "dequantized_weight")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable rank-``rank`` update scaled by ``alpha / rank``."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise StackwiseError(f"LoRA rank must be >= 1, got {rank}")
        if alpha <= 0:
            raise StackwiseError(f"LoRA alpha must be > 0, got {alpha}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank))  # (out, r): zero, so the update starts at 0
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5), generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)
        return self.base(x) + self.scale * F.linear(F.linear(x, a), b)  # (..., out): base + s * (x A^T) B^T

    def delta(self) -> torch.Tensor:
        """The update (alpha / r) * B @ A, (out, in) in fp32."""
        return self.scale * (self.lora_b.detach().float() @ self.lora_a.detach().float())

    def base_weight(self) -> torch.Tensor:
        """The base layer's weight (out, in) as this layer computes with it, in fp32."""
        if hasattr(self.base, "dequantized_weight"):
            return self.base.dequantized_weight(torch.float32)
        return self.base.weight.detach().float()

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight (base + update) in fp32, for code that reads ``linear.weight`` (e.g. MLA's decode)."""
        return self.base_weight() + self.delta()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def add_lora(
    stack: nn.Module, rank: int, alpha: float, generator: torch.Generator | None = None
) -> dict[str, LoRALinear]:
    """Wrap every linear layer of every block of ``stack`` (attention projections of whatever kind, MLP layers) in a
    ``LoRALinear``, in place. Returns them by their path in the stack (``blocks.0.attn.q``), in module order.

    Only ``stack.blocks`` is adapted: the time network (diffusion) is not part of any exported model."""
    out: dict[str, LoRALinear] = {}
    for parent_name, parent in list(stack.blocks.named_modules(prefix="blocks")):
        if isinstance(parent, LoRALinear):
            continue
        for name, child in list(parent.named_children()):
            if is_linear(child):
                layer = LoRALinear(child, rank, alpha, generator)
                setattr(parent, name, layer)
                out[f"{parent_name}.{name}"] = layer
    return out


def lora_layers(module: nn.Module) -> dict[str, LoRALinear]:
    """The ``LoRALinear`` layers in ``module``, by path."""
    return {n: m for n, m in module.named_modules() if isinstance(m, LoRALinear)}


class Adapters(nn.Module):
    """The adapter parameters of several layers gathered into one module, so a checkpoint holds them alone (and
    not the frozen base beside them). Names are the layers' paths with '/' for '.', which module names cannot hold:
    ``0/blocks/0/attn/q/lora_a``. The parameters are the layers' own, shared, not copies."""

    def __init__(self, layers: dict[str, LoRALinear]):
        super().__init__()
        for path, layer in layers.items():
            key = path.replace(".", "/")
            self.register_parameter(f"{key}/lora_a", layer.lora_a)
            self.register_parameter(f"{key}/lora_b", layer.lora_b)


@torch.no_grad()
def merge_lora(original: nn.Module, adapted: nn.Module) -> nn.Module:
    """Add each adapter of ``adapted`` to the same layer's weight in ``original`` (in place; returns it):
    W' = W + (alpha / r) * B @ A, in fp32. ``original`` is the model with plain ``nn.Linear`` layers holding the
    fp32 weights the adapted model's frozen base was made from."""
    for path, layer in lora_layers(adapted).items():
        target = original.get_submodule(path)
        if not isinstance(target, nn.Linear) or target.weight.shape != (layer.out_features, layer.in_features):
            raise StackwiseError(f"cannot merge the adapter at {path}: the original has no matching linear layer")
        merged = target.weight.float() + layer.delta().to(target.weight.device)
        target.weight.copy_(merged.to(target.weight.dtype))
    return original


PEFT_DIR = "adapter"  # fused/adapter: the adapters as peft saves them


def peft_tensors(rack: nn.Module, fmt) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The adapters of ``rack`` (a ``Rack`` with ``LoRALinear`` layers in its stacks) under the names peft gives
    them on the exported model (``base_model.model.<HF module>.lora_A.weight``, (r, in); ``lora_B``, (out, r)), and
    the HF module names they adapt. ``fmt``: the family's ``model.hf.HFFormat``, whose tables name the modules.
    Raises a StackwiseError where one of our layers is not one HF module (GPT-2's fused c_attn, its Conv1D layers)."""
    tensors, modules, g = {}, [], 0
    for stack in rack.stacks:
        for block in stack.blocks:
            for path, layer in lora_layers(block).items():
                hf = fmt.block.get(f"{path}.weight")
                shared = [k for k, v in fmt.block.items() if v == hf and k.endswith(".weight")]
                if not isinstance(hf, str) or len(shared) != 1 or hf in fmt.conv1d:
                    raise StackwiseError(
                        f"no peft adapter for transformers' {fmt.label}: our {path} is not one linear layer there "
                        f"({hf})"
                    )
                module = fmt.layer_prefix.format(g=g) + hf.removesuffix(".weight")
                a = layer.lora_a.detach().float().cpu().contiguous()
                b = layer.lora_b.detach().float().cpu().contiguous()
                tensors[f"base_model.model.{module}.lora_A.weight"] = a
                tensors[f"base_model.model.{module}.lora_B.weight"] = b
                modules.append(module)
            g += 1
    return tensors, modules


def write_peft_adapter(out_dir, rack: nn.Module, fmt, rank: int, alpha: float, base: str = "") -> None:
    """Write ``out_dir`` as peft writes a LoRA adapter (``adapter_config.json``, ``adapter_model.safetensors``):
    ``peft.PeftModel.from_pretrained(base_model, out_dir)`` on the rack exported unmerged (``stackwise fuse``
    without a fine-tune) computes what the merged export computes. Written into a temporary folder and renamed."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import save_file

    from stackwise_cli.store.files import atomic_replace_dir, tmp_name

    tensors, modules = peft_tensors(rack, fmt)
    config = {
        "peft_type": "LORA",
        "task_type": None if fmt.bidirectional else "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": modules,  # full names: exactly the layers that trained, nothing else that shares a name
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    out_dir = Path(out_dir)
    tmp = tmp_name(out_dir)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        atomic_replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
