"""The memory planner (stackwise_cli/bench/plan.py): parameter counts against the real modules, the activation
estimate against what autograd saves, how bytes scale, the 70B headline, and the ``bench plan`` CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from stackwise_cli.app import app
from stackwise_cli.bench.plan import (
    GPUS,
    KINDS,
    ActDtypes,
    Params,
    PlanOptions,
    block_bytes_per_token,
    param_counts,
    plan,
)
from stackwise_cli.errors import StackwiseError
from stackwise_cli.flops import block_shapes, ends_shapes, time_shapes
from stackwise_cli.model.model import Ends, Stack
from stackwise_cli.recipe import load_recipe

ENV = {"COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb", "STACKWISE_DEBUG": None}
TINY = "recipes/llama/tiny.yaml"
B70 = "recipes/llama/70b.yaml"
BIG = 10**15  # a device nothing fails to fit
# The stages stack-wise training of the 70B model runs; fuse-full and fuse-lora hold the whole model trainable or
# in bf16, like end-to-end training.
STACKWISE = ("train-stack-l2r", "train-stack-r2l", "cache", "fuse-qlora")


def shapes_of(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in module.named_parameters()}


@pytest.mark.parametrize(
    "path, sets",
    [
        (TINY, []),
        ("recipes/llama/tiny-mla.yaml", []),
        ("recipes/llama/tiny-mla.yaml", ["attention.q_rank=48"]),
        (TINY, ["attention.kind=linear"]),
        (TINY, ["model.tie_embeddings=true", "model.n_kv_heads=null", "attention.kind=mha"]),
        ("recipes/llama/tiny-diffusion.yaml", ["diffusion.time=input", "model.time_embedding=true"]),
    ],
)
def test_shapes_and_counts_are_the_real_modules(path, sets):
    r = load_recipe(path, sets)
    assert block_shapes(r.model, r.attention) == shapes_of(Stack(r.model, 1, r.attention).blocks[0])
    assert ends_shapes(r.model) == shapes_of(Ends(r.model))
    stacks = [Stack(r.model, r.rack.blocks_per_stack, r.attention) for _ in range(r.rack.stacks)]
    counts = param_counts(r)
    assert counts["stack"] == sum(p.numel() for p in stacks[0].parameters())
    assert counts["total"] == sum(p.numel() for m in [Ends(r.model), *stacks] for p in m.parameters())
    assert counts["block"] == r.model.block_params(r.attention)
    assert counts["stack"] == r.model.stack_params(r.rack.blocks_per_stack, r.attention)  # time network included
    time = {} if stacks[0].time is None else {f"time.{n}": s for n, s in shapes_of(stacks[0].time).items()}
    assert time_shapes(r.model) == time


def test_70b_parameter_count():
    m = load_recipe(B70).model
    L = 80
    per_block = m.d_model * m.head_dim * (2 * m.n_heads + 2 * m.kv_heads) + 3 * m.d_model * m.ffn_dim + 2 * m.d_model
    expected = L * per_block + 2 * m.vocab_size * m.d_model + m.d_model
    counts = param_counts(load_recipe(B70))
    assert counts["total"] == expected
    assert abs(counts["total"] - 68.98e9) < 0.01e9  # LLaMA-2-70B: 68,976,648,192


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_estimate_matches_what_autograd_saves(precision):
    r = load_recipe(TINY)
    B, T = 2, 64
    stack = Stack(r.model, 2, r.attention)
    param_ptrs = {p.untyped_storage().data_ptr() for p in stack.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in param_ptrs:
            saved[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randn(B, T, r.model.d_model, requires_grad=True)  # a block inside a rack: its input needs grad
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        stack(x)
    expected = 2 * block_bytes_per_token(r.model, r.attention, T, ActDtypes.of(precision)) * B * T
    if precision == "bf16":  # autocast's bf16 copies of the weights, the plan's "weights" row
        expected += 2 * sum(p.numel() for p in stack.parameters() if p.dim() == 2)
    assert sum(saved.values()) == pytest.approx(expected, rel=0.05)


def test_doubling_the_batch_doubles_activations_only():
    r = load_recipe(TINY)
    one = plan(r, BIG, PlanOptions(batch_size=4, precision="fp32"))
    two = plan(r, BIG, PlanOptions(batch_size=8, precision="fp32"))
    for a, b in zip(one.stages, two.stages, strict=True):
        if a.name == "cache":  # computed with the recipe's cache.batch_size, not the training batch
            assert a.bytes == b.bytes
            continue
        assert b.bytes["activations"] == pytest.approx(2 * a.bytes["activations"], rel=1e-6)
        for kind in ("weights", "gradients", "optimizer", "master", "frozen", "headroom"):
            assert b.bytes[kind] == a.bytes[kind], (a.name, kind)
    # the cache stage has its own batch size; train-stack's cached input batch doubles with the batch
    l2r = plan(r, BIG, PlanOptions(batch_size=4, precision="fp32")).stage("train-stack-l2r", "cached")
    l2r2 = plan(r, BIG, PlanOptions(batch_size=8, precision="fp32")).stage("train-stack-l2r", "cached")
    assert l2r2.bytes["cache_buffers"] == 2 * l2r.bytes["cache_buffers"] > 0


def test_adamw8bit_is_about_a_quarter_of_adamw():
    r = load_recipe(B70)
    # 8192-token sequences: the activations exceed AdamW's step temporaries, so the row holds the states only
    full = plan(r, BIG, PlanOptions(optimizer="adamw", seq_len=8192)).stage("train-stack-l2r")
    small = plan(r, BIG, PlanOptions(optimizer="adamw8bit", seq_len=8192)).stage("train-stack-l2r")
    # every 70B tensor has >= 4096 values: 2 x (1 B + 4 B / 256) against 2 x 4 B
    assert small.bytes["optimizer"] / full.bytes["optimizer"] == pytest.approx((2 + 8 / 256) / 8, rel=1e-6)
    assert small.bytes["weights"] == full.bytes["weights"]


def test_nf4_suffix_is_smaller_than_bf16():
    r = load_recipe(B70)
    by = {
        d: plan(r, BIG, PlanOptions(frozen_dtype=d)).stage("train-stack-r2l").bytes["frozen"] for d in ("bf16", "nf4")
    }
    by["fp8"] = plan(r, BIG, PlanOptions(frozen_dtype="fp8")).stage("train-stack-r2l").bytes["frozen"]
    assert by["nf4"] < by["fp8"] < by["bf16"]
    suffix = param_counts(r)["blocks"] - param_counts(r)["stack"]
    counts = param_counts(r)
    block_matmul = counts["block"] - 2 * r.model.d_model  # the two norm weights are not matmul weights
    # the suffix in bf16, the frozen final norm and head in fp32 (with a suffix only the new stack and embedding
    # train, as train/curriculum.py does), and one block's weights dequantised and cast to bf16 for its backward (all
    # but o and down, which read bf16 inputs and use the stored weight: the next test)
    head_and_norm = counts["head"] + counts["final_norm"]
    o_and_down = r.model.d_model * (r.model.n_heads * r.model.head_dim + r.model.ffn_dim)
    assert by["bf16"] == pytest.approx(2 * suffix + 4 * head_and_norm + 2 * (block_matmul - o_and_down), rel=1e-3)
    nf4_suffix = by["nf4"] - 4 * head_and_norm  # + one dequantised layer
    assert nf4_suffix / suffix == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), abs=0.01)


def test_checkpointing_reduces_activations_and_adds_a_forward():
    r = load_recipe("recipes/llama/small.yaml")
    off = plan(r, BIG, PlanOptions(activation_checkpointing=False))
    on = plan(r, BIG, PlanOptions(activation_checkpointing=True))
    for name in ("train-stack-l2r", "train-stack-r2l", "fuse-full", "fuse-lora", "end-to-end"):
        assert on.stage(name).bytes["activations"] < off.stage(name).bytes["activations"], name
        assert on.stage(name).flops_per_token > off.stage(name).flops_per_token, name
    assert on.stage("cache").bytes == off.stage("cache").bytes


def test_70b_headline_every_stackwise_stage_fits_an_h200_and_end_to_end_does_not():
    p = plan(load_recipe(B70), GPUS["h200"])
    for name in STACKWISE:
        assert p.stage(name).fits, (name, p.stage(name).total_bytes)
    e2e = p.stage("end-to-end")
    assert not e2e.fits
    # not even with checkpointing and 8-bit AdamW: the states alone are several H200s
    frugal = plan(load_recipe(B70), GPUS["h200"], PlanOptions(activation_checkpointing=True, optimizer="adamw8bit"))
    assert not frugal.stage("end-to-end").fits
    # only one stack's optimizer state is ever live
    stack = p.stage("train-stack-l2r")
    assert stack.bytes["optimizer"] < e2e.bytes["optimizer"] / 10
    assert stack.params_trainable < param_counts(load_recipe(B70))["total"] / 10


def test_flops_and_cache_disk():
    r = load_recipe(B70)
    p = plan(r, BIG, PlanOptions(tflops=400))
    m, L, T = r.model, 80, r.data.seq_len
    matmul = L * (m.block_params() - 2 * m.d_model) + m.vocab_size * m.d_model
    # 6 N per token for the matmuls, and 6 L T d for causal attention scores and weighted sums, fwd + bwd
    e2e = p.stage("end-to-end")
    assert e2e.flops_per_token == pytest.approx(6 * matmul + 6 * L * T * m.d_model)
    assert e2e.tokens_per_day == pytest.approx(400e12 * 86400 / e2e.flops_per_token)
    assert p.stage("train-stack-l2r").flops_per_token < e2e.flops_per_token / 10
    assert p.stage("train-stack-r2l").flops_per_token > p.stage("train-stack-l2r").flops_per_token
    assert p.cache_disk_bytes_per_billion_tokens == {"bf16": 16_384 * 10**9, "fp32": 32_768 * 10**9, "fp8": 8196e9}


@pytest.mark.parametrize(
    "options",
    [
        {"precision": "fp64"},
        {"optimizer": "sgd"},
        {"frozen_dtype": "int3"},
        {"batch_size": -1},
        {"seq_len": 0},
        {"lora_rank": 0},
        {"tflops": -5.0},
    ],
)
def test_bad_options_name_the_valid_values(options):
    with pytest.raises(StackwiseError) as e:
        PlanOptions(**options)
    name = next(iter(options))
    if name in ("precision", "optimizer", "frozen_dtype"):
        valid = {"precision": "fp8", "optimizer": "adamw8bit", "frozen_dtype": "nf4"}[name]
        assert valid in str(e.value)


def test_every_kind_in_every_stage_and_json_round_trip():
    p = plan(load_recipe(TINY), GPUS["h100"], replace(PlanOptions(), precision="fp8"))
    data = json.loads(json.dumps(p.to_data()))
    assert [s["name"] for s in data["stages"]] == [s.name for s in p.stages]
    for s in data["stages"]:
        assert set(s["bytes"]) == set(KINDS)
        assert s["total_bytes"] == sum(s["bytes"].values())


def cli(*args: str):
    return CliRunner().invoke(app, ["bench", "plan", *args], env=ENV)


def test_cli_json():
    result = cli("--recipe", B70, "--gpu", "h200", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["device_bytes"] == GPUS["h200"]
    fits = {s["name"]: s["fits"] for s in data["stages"]}
    assert all(fits[n] for n in STACKWISE) and not fits["end-to-end"]


def test_cli_table_and_bytes_gpu():
    result = cli("--recipe", TINY, "--gpu", "4e9", "--precision", "fp32", "--set", "train.batch_size=4")
    assert result.exit_code == 0, result.output
    assert "train-stack-r2l" in result.stdout and "optimizer state" in result.stdout and "3.73" in result.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["--gpu", "a100"], ["h100", "h200"]),
        (["--gpu", "-3"], ["h100"]),
        (["--precision", "fp64"], ["fp32", "bf16", "fp16", "fp8"]),
        (["--batch-size", "-2"], ["batch size"]),
    ],
)
def test_cli_bad_input_is_one_error_line(args, words):
    result = cli("--recipe", TINY, *args)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.output.count("error:") == 1
    for w in words:
        assert w in result.output


def test_adamw_step_temporaries_follow_the_device_the_plan_is_for():
    """CUDA runs AdamW's fused step (no temporaries): the optimizer row is the two moments alone. The CPU runs the
    foreach step, measured at max(8 B x largest tensor, 3 B/param), of which the part beyond the freed activations
    is added; that CPU figure is unchanged."""
    from stackwise_cli.bench.plan import Params, optimizer_step_bytes
    from stackwise_cli.flops import block_shapes

    r = load_recipe(B70)
    options = {"batch_size": 1, "seq_len": 4096}
    cuda = plan(r, BIG, PlanOptions(**options)).stage("train-stack-l2r", "leftmost")
    cpu = plan(r, BIG, PlanOptions(device="cpu", **options)).stage("train-stack-l2r", "leftmost")
    assert cuda.bytes["optimizer"] == 8 * cuda.params_trainable  # the 70B leftmost stack: 29.4 GiB, no step extra
    temporaries = max(8 * 32000 * 8192, 3 * cpu.params_trainable)  # the embedding is the largest tensor
    assert cpu.bytes["optimizer"] == 8 * cpu.params_trainable + temporaries - cpu.bytes["activations"]
    block = Params.of(block_shapes(r.model, r.attention).values())
    assert optimizer_step_bytes(block, "adamw", "cuda") == 0 < optimizer_step_bytes(block, "adamw", "cpu")
    assert cuda.total_bytes < GPUS["h100"]  # the 70B left-to-right stage fits an H100


def test_make_optimizer_runs_the_step_the_plan_counts():
    from stackwise_cli.recipe import TrainRecipe
    from stackwise_cli.train.defaults import adamw_step
    from stackwise_cli.train.optim import make_optimizer

    assert (adamw_step("cuda"), adamw_step("cpu")) == ("fused", "foreach")
    params = {"w": torch.nn.Parameter(torch.randn(4, 4)), "g": torch.nn.Parameter(torch.ones(4))}
    assert not make_optimizer(params, TrainRecipe()).defaults["fused"]  # CPU: torch's default foreach step
    if torch.cuda.is_available():
        on_gpu = {n: torch.nn.Parameter(p.detach().cuda()) for n, p in params.items()}
        assert make_optimizer(on_gpu, TrainRecipe()).defaults["fused"] is True


def test_grad_accum_multiplies_tokens_and_flops_per_step_not_bytes():
    r = load_recipe(TINY)
    one = plan(r, BIG, PlanOptions(precision="fp32"))
    four = plan(r, BIG, PlanOptions(precision="fp32", grad_accum=4))
    via_recipe = plan(load_recipe(TINY, ["train.grad_accum=4"]), BIG, PlanOptions(precision="fp32"))
    assert [s.to_data() for s in four.variants] == [s.to_data() for s in via_recipe.variants]
    for a, b in zip(one.variants, four.variants, strict=True):
        assert a.bytes == b.bytes  # one micro-batch's activations are live at a time
        assert b.flops_per_token == a.flops_per_token and b.tokens_per_day == a.tokens_per_day
        if a.name == "cache":  # a forward pass, no optimizer step
            assert b.grad_accum == 1 and b.tokens_per_step == a.tokens_per_step == a.batch_size * a.seq_len
            continue
        assert (a.grad_accum, b.grad_accum) == (1, 4)
        assert a.tokens_per_step == a.batch_size * a.seq_len and b.tokens_per_step == 4 * a.tokens_per_step
        assert b.flops_per_step == pytest.approx(4 * a.flops_per_step)
        assert a.flops_per_step == pytest.approx(a.flops_per_token * a.tokens_per_step)
    with pytest.raises(StackwiseError, match="grad accum must be >= 1, got 0"):
        PlanOptions(grad_accum=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lora_activation_estimate_matches_what_autograd_saves(precision):
    """A LoRA fine-tune's blocks as train/finetune.py builds them (bf16 FrozenLinear base, rank-r adapters, fp32
    residual): the plan's per-block bytes plus the dequantised base weights each block keeps for backward."""
    from stackwise_cli.bench.plan import dequantised_block_bytes
    from stackwise_cli.train.frozen import freeze
    from stackwise_cli.train.lora import add_lora

    r, rank, B, T = load_recipe(TINY), 4, 2, 64
    stack = freeze(Stack(r.model, 2, r.attention), "bf16")
    add_lora(stack, rank, float(rank))
    for n, p in stack.named_parameters():
        p.requires_grad_("lora_" in n)
    own = {t.untyped_storage().data_ptr() for t in [*stack.parameters(), *stack.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in own:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(B, T, r.model.d_model, requires_grad=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        stack(x)
    dt = ActDtypes.of(precision)
    expected = 2 * block_bytes_per_token(r.model, r.attention, T, dt, rank) * B * T
    expected += 2 * dequantised_block_bytes(r.model, r.attention, dt, "bf16")  # the base weights each block keeps
    if precision == "bf16":  # autocast's bf16 copies of the adapters, the plan's "weights" row
        expected += 2 * sum(p.numel() for p in stack.parameters() if p.requires_grad)
    assert sum(saved.values()) == pytest.approx(expected, rel=0.05)


def test_frozen_norm_weights_stay_fp32_in_every_storage():
    """frozen.freeze replaces only linear layers: a norm weight of a bf16, fp8 or 4-bit suffix is still fp32."""
    from stackwise_cli.bench.plan import FROZEN_DTYPES, Params, frozen_bytes
    from stackwise_cli.train.frozen import freeze

    stack = Stack(load_recipe(TINY).model, 1, load_recipe(TINY).attention)
    for dtype in FROZEN_DTYPES:
        assert frozen_bytes(Params.of([(64,)]), dtype) == 4 * 64, dtype
    frozen = freeze(stack, "bf16")
    assert {p.dtype for n, p in frozen.named_parameters() if "norm" in n} == {torch.float32}


def test_a_bf16_suffix_under_autocast_keeps_no_copy_of_o_and_down():
    """Under bf16 autocast a bf16 FrozenLinear reading a bf16 tensor (o reads the attention output, down the SwiGLU
    product) computes with its stored weight: only the other layers' casts are new bytes while a block recomputes
    (what autograd saves for such a block: test_lora_activation_estimate_matches_what_autograd_saves)."""
    r = load_recipe(B70)
    m = r.model
    bf16 = plan(r, BIG, PlanOptions(frozen_dtype="bf16")).stage("train-stack-r2l")
    fp8 = plan(r, BIG, PlanOptions(frozen_dtype="fp8")).stage("train-stack-r2l")
    counts = param_counts(r)
    suffix_blocks = r.rack.stacks * r.rack.blocks_per_stack - r.rack.blocks_per_stack
    norms = 2 * m.d_model * suffix_blocks
    suffix_matmul = counts["blocks"] - counts["stack"] - norms
    head_and_norm = counts["head"] + counts["final_norm"]
    block_matmul = counts["block"] - 2 * m.d_model
    o_and_down = m.d_model * m.n_heads * m.head_dim + m.d_model * m.ffn_dim
    stored = 2 * suffix_matmul + 4 * norms + 4 * head_and_norm
    assert bf16.bytes["frozen"] == stored + 2 * (block_matmul - o_and_down)
    # fp8 decodes every layer into a new tensor: a whole block's weights in bf16, beside the codes and row scales
    rows = sum(s[0] for s in block_shapes(m, r.attention).values() if len(s) == 2) * suffix_blocks
    assert fp8.bytes["frozen"] == suffix_matmul + 4 * rows + 4 * norms + 4 * head_and_norm + 2 * block_matmul


def test_cache_from_tokens_streams_one_stack_at_any_position_and_incremental_only_where_cache_runs_it():
    """train/cache.py from the tokens: the ends + one stack on the device, one batch there and back, p stack passes
    at position p; incremental: one stack pass. Diffusion time-as-depth and fp8 caches always run from the tokens."""
    from stackwise_cli.bench.plan import frozen_bytes
    from stackwise_cli.flops import FlopShapes, cache_flops_per_token

    r = load_recipe(TINY, ["rack.stacks=4", "cache.dtype=bf16"])
    p = plan(r, BIG, PlanOptions(precision="fp32"))
    tokens, incremental = p.stage("cache", "from-tokens"), p.stage("cache", "incremental")
    assert tokens.bytes["cache_buffers"] == incremental.bytes["cache_buffers"]
    assert tokens.bytes["cache_buffers"] == 2 * 4 * r.model.d_model * r.cache.batch_size * r.data.seq_len
    k = r.rack.blocks_per_stack
    stack = Params.of(block_shapes(r.model, r.attention).values(), k)
    ends = Params.of(ends_shapes(r.model).values())
    assert tokens.bytes["frozen"] == frozen_bytes(stack + ends, "fp32")  # one stack, whatever the depth
    one = 2 * Params.of(block_shapes(r.model, r.attention).values(), k).matmul + k * FlopShapes.of(r).attention
    assert incremental.flops_per_token == pytest.approx(one)
    assert tokens.flops_per_token == pytest.approx(3 * one)  # the last stack's cache: 3 stacks from the tokens
    for position in (1, 2, 3):
        assert cache_flops_per_token(FlopShapes.of(r), [k] * position) == pytest.approx(position * one)
    assert tokens.flops_per_step == pytest.approx(tokens.flops_per_token * r.cache.batch_size * r.data.seq_len)
    for only_tokens in (
        load_recipe(TINY, ["rack.stacks=4", "cache.dtype=fp8"]),
        load_recipe("recipes/llama/tiny-diffusion.yaml", ["rack.stacks=4"]),
    ):
        planned = plan(only_tokens, BIG, PlanOptions(precision="fp32"))
        assert [v.variant for v in planned.variants if v.name == "cache"] == ["from-tokens"]
    time_input = load_recipe(
        "recipes/llama/tiny-diffusion.yaml", ["rack.stacks=4", "diffusion.time=input", "model.time_embedding=true"]
    )
    assert plan(time_input, BIG).stage("cache", "incremental")  # t drawn per sequence: one corruption, incremental
