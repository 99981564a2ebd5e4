"""The transforms a run applies to its modules, once and in order, before the optimizer is built.

freeze (and the frozen weights' storage) -> LoRA adapters -> onto the device -> fp8 -> kernels -> activation
checkpointing -> FSDP2 -> torch.compile. Each is a small object with a ``name``, ``wanted(ctx)`` (from the recipe and
the run's options) and ``apply(modules, ctx)``; ``apply_transforms`` runs the wanted ones in ``TRANSFORMS`` order
and returns their names. The order is torchtitan's: quantisation changes the layers before anything wraps them,
checkpointing wraps the blocks that FSDP2 then shards, and compile sees the finished modules. Adding a parallelism
or a quantisation is one class here, its recipe option and its place in ``TRANSFORMS``.

What trains is chosen after: ``freeze`` turns every gradient off and the caller turns on those of the parameters
its stage trains (the fp8 and FSDP2 transforms keep or replace parameters, so they are listed once they are final).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from stackwise_cli.train import distributed


@dataclass(frozen=True, kw_only=True)
class Lora:
    """The adapters of a LoRA or QLoRA fine-tune: rank, alpha, and the seed of the one generator every A is drawn
    from (the same project gives the same initial adapters)."""

    rank: int
    alpha: float
    seed: int


@dataclass(frozen=True, kw_only=True)
class Context:
    """What the transforms read: the run's device and precision, and what its recipe and options ask for."""

    device: torch.device
    precision: str
    checkpointing: bool = False  # the stacks' blocks under activation checkpointing (train.activation_checkpointing,
    # or train.finetune_checkpointing in a fine-tune)
    compile: bool = False  # train.compile
    storage: str | None = None  # the frozen stacks' weight storage (``frozen.freeze``); None: as loaded, fp32
    lora: Lora | None = None


@dataclass
class Modules:
    """What a run transforms: its stacks by name (a stack id), the ends, and the adapters the LoRA transform adds,
    by ``<stack name>.<layer path>``."""

    stacks: dict[str, nn.Module]
    ends: nn.Module
    adapters: dict[str, nn.Module] = field(default_factory=dict)


class Freeze:
    """Every parameter frozen; with ``ctx.storage`` the stacks' linear weights held in that storage."""

    name = "freeze"

    def wanted(self, ctx: Context) -> bool:
        return True

    def apply(self, modules: Modules, ctx: Context) -> None:
        from stackwise_cli.train.frozen import freeze

        for mod in [*modules.stacks.values(), modules.ends]:
            for p in mod.parameters():
                p.requires_grad_(False)
            if ctx.storage is not None and mod is not modules.ends:
                freeze(mod, ctx.storage)


class Adapters:
    """A LoRA adapter on every linear layer of every block, made on the CPU from one seeded generator."""

    name = "lora"

    def wanted(self, ctx: Context) -> bool:
        return ctx.lora is not None

    def apply(self, modules: Modules, ctx: Context) -> None:
        from stackwise_cli.train.lora import add_lora

        gen = torch.Generator().manual_seed(ctx.lora.seed)
        for key, stack in modules.stacks.items():
            layers = add_lora(stack, ctx.lora.rank, ctx.lora.alpha, gen)
            modules.adapters.update({f"{key}.{path}": layer for path, layer in layers.items()})


class Place:
    """Onto the run's device (after the storage and adapters are made, as their initial values are on the CPU)."""

    name = "place"

    def wanted(self, ctx: Context) -> bool:
        return True

    def apply(self, modules: Modules, ctx: Context) -> None:
        for mod in [*modules.stacks.values(), modules.ends]:
            mod.to(ctx.device)


class Fp8:
    """``--precision fp8``: the stacks' linear layers become scaled fp8 matmuls holding the same parameters."""

    name = "fp8"

    def wanted(self, ctx: Context) -> bool:
        return ctx.precision == "fp8"

    def apply(self, modules: Modules, ctx: Context) -> None:
        from stackwise_cli.train.fp8 import to_fp8

        for stack in modules.stacks.values():
            to_fp8(stack)


class Kernels:
    """The attention backend resolved once for the device and pinned on every attention layer (``auto`` becomes what
    it picks here): an explicit backend that cannot run fails now, before any step."""

    name = "kernels"

    def wanted(self, ctx: Context) -> bool:
        return True

    def apply(self, modules: Modules, ctx: Context) -> None:
        from stackwise_cli.model.attention import resolve_backend

        for stack in modules.stacks.values():
            for layer in stack.modules():
                if hasattr(layer, "backend") and hasattr(layer, "kind"):
                    layer.backend = resolve_backend(layer.backend, layer.kind, ctx.device)


class Checkpointing:
    """Each block of each stack under activation checkpointing, wrapped once (``frozen.checkpoint_blocks``)."""

    name = "checkpointing"

    def wanted(self, ctx: Context) -> bool:
        return ctx.checkpointing

    def apply(self, modules: Modules, ctx: Context) -> None:
        from stackwise_cli.train.frozen import checkpoint_blocks

        for stack in modules.stacks.values():
            checkpoint_blocks(stack)


class Fsdp:
    """Under torchrun: FSDP2 over each block, then each stack (``distributed.shard``)."""

    name = "fsdp"

    def wanted(self, ctx: Context) -> bool:
        return distributed.active()

    def apply(self, modules: Modules, ctx: Context) -> None:
        distributed.shard(list(modules.stacks.values()), ctx.device, ctx.precision)


class Compile:
    """``train.compile``: each stack compiled in place (``nn.Module.compile``: the same module, parameters and
    state_dict keys), traced at its first forward."""

    name = "compile"

    def wanted(self, ctx: Context) -> bool:
        return ctx.compile

    def apply(self, modules: Modules, ctx: Context) -> None:
        for stack in modules.stacks.values():
            stack.compile()


TRANSFORMS = (Freeze(), Adapters(), Place(), Fp8(), Kernels(), Checkpointing(), Fsdp(), Compile())


def apply_transforms(modules: Modules, ctx: Context) -> list[str]:
    """Apply every wanted transform to ``modules``, in order; returns the names of those applied."""
    applied = []
    for t in TRANSFORMS:
        if t.wanted(ctx):
            t.apply(modules, ctx)
            applied.append(t.name)
    return applied
