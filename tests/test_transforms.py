"""The transform pipeline (train/transforms.py): its order, activation checkpointing wrapped once into the blocks,
and torch.compile on the CPU."""

from __future__ import annotations

import copy

import torch

from stackwise_cli.model.config import ModelConfig
from stackwise_cli.model.model import Ends, Stack
from stackwise_cli.train.frozen import checkpoint_blocks
from stackwise_cli.train.transforms import Context, Lora, Modules, apply_transforms

CPU = torch.device("cpu")


def _tiny(seed: int = 0) -> tuple[Stack, Ends]:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16)
    return Stack(cfg, 2), Ends(cfg)


def _loss(stack: Stack, ends: Ends, tokens: torch.Tensor) -> torch.Tensor:
    logits = ends.logits(stack(ends.embed_tokens(tokens), True))
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), tokens[:, 1:].reshape(-1))


def test_the_pipeline_applies_what_the_run_asks_for_in_order():
    stack, ends = _tiny()
    fp8 = Context(device=CPU, precision="fp8", checkpointing=True)
    assert apply_transforms(Modules({"0": stack}, ends), fp8) == ["freeze", "place", "fp8", "kernels", "checkpointing"]
    stack, ends = _tiny()
    lora = Context(device=CPU, precision="fp32", storage="bf16", lora=Lora(rank=2, alpha=2.0, seed=0), compile=True)
    modules = Modules({"0": stack}, ends)
    assert apply_transforms(modules, lora) == ["freeze", "lora", "place", "kernels", "compile"]
    assert "0.blocks.0.attn.q" in modules.adapters and not any(p.requires_grad for p in ends.parameters())


def test_checkpointed_blocks_keep_their_names_and_give_the_plain_values():
    plain, ends = _tiny()
    wrapped = checkpoint_blocks(copy.deepcopy(plain))
    assert list(wrapped.state_dict()) == list(plain.state_dict())  # checkpoints and stack files read the same keys
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    a, b = _loss(plain, ends, tokens), _loss(wrapped, ends, tokens)
    a.backward()
    b.backward()
    assert torch.equal(a, b)
    for (name, p), q in zip(plain.named_parameters(), wrapped.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_checkpointed_blocks_keep_only_block_inputs_for_backward():
    def saved_bytes(stack: Stack, ends: Ends) -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _loss(stack, ends, torch.zeros(2, 16, dtype=torch.long))
        return total

    plain, ends = _tiny()
    assert saved_bytes(checkpoint_blocks(copy.deepcopy(plain)), ends) < saved_bytes(plain, ends)


def test_compile_runs_a_training_step_on_the_cpu_with_the_uncompiled_loss():
    from stackwise_cli.recipe import TrainRecipe
    from stackwise_cli.train.optim import make_optimizer

    stack, ends = _tiny()
    reference = copy.deepcopy(stack)
    ctx = Context(device=CPU, precision="fp32", checkpointing=True, compile=True)
    assert apply_transforms(Modules({"0": stack}, ends), ctx)[-1] == "compile"
    for p in stack.parameters():
        p.requires_grad_(True)
    opt = make_optimizer(dict(stack.named_parameters()), TrainRecipe())
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = _loss(stack, ends, tokens)
    loss.backward()
    opt.step()
    torch.testing.assert_close(loss, _loss(reference, ends, tokens), rtol=1e-5, atol=1e-5)
    moved = [not torch.equal(p, q) for p, q in zip(stack.parameters(), reference.parameters())]
    assert all(moved) and list(stack.state_dict()) == list(reference.state_dict())
