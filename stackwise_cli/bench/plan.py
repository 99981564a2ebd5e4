"""The memory planner: bytes by kind for every stage of a recipe on one GPU, and FLOPs per token (docs/memory.md).

Pure arithmetic on the recipe's shapes: nothing is allocated and torch is never imported, so a 70B plan answers
at once on a laptop. Every byte count is a documented formula of the shapes; ``docs/memory.md`` gives them all.
The activation estimate counts what the modules in ``model/`` save for backward (checked against
``torch.autograd.graph.saved_tensors_hooks`` on the tiny recipe, see tests/test_plan.py), so the same numbers
hold for a tiny CPU model and for the 70B shape; a ``bench memory`` command can set a measured peak against
``Stage.total_bytes`` or any one of ``Stage.bytes``.

Conventions (one place, used everywhere below):

- ``fp32``: parameters, gradients and activations in fp32; no master copy.
- ``bf16`` / ``fp16``: what a torch loop with fp32 parameters and ``torch.autocast`` allocates. The fp32
  parameters are the *master weights*; the *weights* row is the 2-byte copy autocast casts every matmul weight to
  and keeps for backward; gradients are fp32. The residual stream stays fp32 (fp32 + bf16 promotes), norms
  compute in fp32, and every linear layer saves its own 2-byte cast of its input.
- ``fp8``: as bf16, with the block linears computing on e4m3 (1 byte) casts of their inputs and weights (per-tensor
  scales, a few bytes per layer, not counted); the head stays bf16. On the CPU (``PlanOptions.device``) fp8 is an
  emulation without autocast: matmul outputs and the head stay fp32, and the head has no low-precision copy.
- ``device``: ``cuda`` (the default) adds the CUDA context + allocator headroom row; ``cpu`` does not, and follows
  what the CPU paths compute in (fp8 above; bitsandbytes' 4-bit layers dequantise to fp32 there).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from stackwise_cli.errors import StackwiseError
from stackwise_cli.flops import (
    LINEAR_CHUNK,
    FlopShapes,
    block_shapes,
    cache_flops_per_token,
    ends_shapes,
    lora_flops_per_token,
    numel,
    time_shapes,
    whole_model_flops_per_token,
)
from stackwise_cli.model.config import AttentionConfig, ModelConfig
from stackwise_cli.objectives import objective_kind
from stackwise_cli.recipe import Recipe
from stackwise_cli.train.defaults import (
    FINETUNE_BASE_STORAGE,
    FINETUNE_ENDS_DTYPE,
    FINETUNE_PRECISIONS,
    GPU_PRECISION,
    adamw_step,
)
from stackwise_cli.train.stage import Stage as StageDef
from stackwise_cli.train.stage import flops_per_token as stage_flops
from stackwise_cli.train.stage import planned

# Total memory of each GPU as ``nvidia-smi`` (and ``torch.cuda.mem_get_info``) reports it: 81,559 MiB for the
# H100 SXM 80 GB and 143,771 MiB for the H200 141 GB. What a process can use is that minus the CUDA context,
# cuBLAS workspaces and allocator slack, which HEADROOM_BYTES stands for, shown as its own row.
GPUS: dict[str, int] = {"h100": 81_559 * 2**20, "h200": 143_771 * 2**20}
HEADROOM_BYTES = 2 * 2**30
DEFAULT_TFLOPS = 400.0  # sustained dense bf16 on an H100/H200: ~40% of the 989 TFLOP/s peak

PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
DEVICES = ("cuda", "cpu")
OPTIMIZERS = ("adamw", "adamw8bit")
FROZEN_DTYPES = ("fp32", "bf16", "fp8", "nf4", "fp4")
CACHE_DTYPES = ("bf16", "fp32", "fp8")
STAGES = (
    "train-stack-l2r",
    "train-stack-r2l",
    "cache",
    "fuse-full",
    "fuse-lora",
    "fuse-qlora",
    "end-to-end",
)
# The rows of every stage, in table order.
KINDS = (
    "weights",
    "gradients",
    "optimizer",
    "master",
    "activations",
    "frozen",
    "cache_buffers",
    "headroom",
)
KIND_LABELS = {
    "weights": "weights",
    "gradients": "gradients",
    "optimizer": "optimizer state",
    "master": "master weights",
    "activations": "activations",
    "frozen": "frozen weights",
    "cache_buffers": "cache buffers",
    "headroom": "CUDA context + allocator",
}

ADAM8BIT_BLOCK = 256  # bitsandbytes 8-bit optimizers: one fp32 absmax per 256 values of each state
ADAM8BIT_MIN_NUMEL = 4096  # bitsandbytes keeps tensors smaller than this in 32-bit state
NF4_BLOCK = 64  # bitsandbytes 4-bit weights: one absmax per 64 weights ...
NF4_DQ_BLOCK = 256  # ... quantised to 8 bits (double quantisation), with one fp32 absmax per 256 of them
LOSS_BYTES_PER_LOGIT = 12  # logits + their fp32 log-softmax + its gradient, live together at the loss (see below)


# ----------------------------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True, kw_only=True)
class PlanOptions:
    """What the plan assumes beyond the recipe. ``None`` for batch size / sequence length = the recipe's."""

    batch_size: int | None = None  # sequences per micro-batch (default train.batch_size)
    grad_accum: int | None = None  # micro-batches per optimizer step (default train.grad_accum)
    seq_len: int | None = None  # tokens per sequence (default data.seq_len)
    precision: str = GPU_PRECISION  # what train-stack and fuse run on a GPU by default (--precision auto)
    optimizer: str = "adamw"
    activation_checkpointing: bool | None = None  # None: off for train-stack and end-to-end, on for fuse
    frozen_dtype: str = "nf4"  # right-to-left: storage of the frozen suffix
    lora_rank: int = 16
    tflops: float = DEFAULT_TFLOPS  # sustained TFLOP/s, for tokens per day
    headroom_bytes: int | None = None  # None: HEADROOM_BYTES on cuda, 0 on cpu
    device: str = "cuda"  # what the plan is for: "cpu" has no CUDA context row and the CPU's compute dtypes
    shards: int = 1  # ranks one stack is sharded over under torchrun (FSDP2): the train stages' bytes are per rank

    def __post_init__(self) -> None:
        if self.headroom_bytes is None:
            object.__setattr__(self, "headroom_bytes", HEADROOM_BYTES if self.device == "cuda" else 0)
        problems = []
        for name, value, valid in (
            ("device", self.device, DEVICES),
            ("precision", self.precision, PRECISIONS),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("frozen dtype", self.frozen_dtype, FROZEN_DTYPES),
        ):
            if value not in valid:
                problems.append(f"{name} must be one of {', '.join(valid)}, got {value!r}")
        for name in ("batch_size", "grad_accum", "seq_len", "lora_rank", "shards"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name.replace('_', ' ')} must be >= 1, got {value}")
        if not self.tflops > 0:
            problems.append(f"tflops must be > 0, got {self.tflops}")
        if self.headroom_bytes < 0:
            problems.append(f"headroom must be >= 0 bytes, got {self.headroom_bytes}")
        if problems:
            raise StackwiseError("; ".join(problems))


def gpu_bytes(name: str) -> int:
    """``h100``, ``h200`` or a byte count (``150e9`` and ``141_000_000_000`` work) -> bytes."""
    key = name.strip().lower()
    if key in GPUS:
        return GPUS[key]
    try:
        value = float(key.replace("_", ""))
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value <= 0:
        raise StackwiseError(f"--gpu must be one of {', '.join(GPUS)} or a positive number of bytes, got {name!r}")
    return int(value)


@dataclass(frozen=True)
class Params:
    """A set of parameter tensors: (shape, whether a matmul reads it) each, with the sums the formulas need.

    A matmul weight costs 2 FLOPs per token forward and is what autocast casts; the embedding is a lookup
    (unless tied, when the head multiplies by it) and norm weights are elementwise."""

    tensors: tuple[tuple[tuple[int, ...], bool], ...] = ()

    @staticmethod
    def of(shapes, repeat: int = 1, matmul: bool | None = None) -> Params:
        one = tuple((tuple(s), len(s) == 2 if matmul is None else matmul) for s in shapes)
        return Params(one * repeat)

    def __add__(self, other: Params) -> Params:
        return Params(self.tensors + other.tensors)

    @property
    def count(self) -> int:
        return sum(numel(s) for s, _ in self.tensors)

    @property
    def matmul(self) -> int:
        """Parameters that matmuls read."""
        return sum(numel(s) for s, mm in self.tensors if mm)

    @property
    def largest(self) -> int:
        return max((numel(s) for s, _ in self.tensors), default=0)


def param_counts(recipe: Recipe) -> dict[str, int]:
    """Parameters of one block, one stack, the whole rack, and each of the ends."""
    block = sum(numel(s) for s in block_shapes(recipe.model, recipe.attention).values())
    time = sum(numel(s) for s in time_shapes(recipe.model).values())  # one per stack
    ends = ends_shapes(recipe.model)
    n_blocks = recipe.rack.stacks * recipe.rack.blocks_per_stack
    blocks = block * n_blocks + time * recipe.rack.stacks
    return {
        "block": block,
        "stack": block * recipe.rack.blocks_per_stack + time,
        "blocks": blocks,
        "embed": numel(ends["embed.weight"]),
        "final_norm": numel(ends["norm.weight"]),
        "head": numel(ends["head.weight"]) if "head.weight" in ends else 0,
        "total": blocks + sum(numel(s) for s in ends.values()),
    }


# ----------------------------------------------------------------------------------------------------------------
# Bytes per parameter


def optimizer_bytes(p: Params, optimizer: str) -> float:
    """AdamW: two fp32 moments, 8 B/param. bitsandbytes AdamW8bit: two uint8 moments with one fp32 absmax per
    256 values each, 2 * (1 + 4/256) B/param, for tensors of >= 4096 elements (smaller ones stay 32-bit)."""
    if optimizer == "adamw":
        return 8.0 * p.count
    total = 0.0
    for s, _ in p.tensors:
        n = numel(s)
        total += 8 * n if n < ADAM8BIT_MIN_NUMEL else 2 * (n + 4 * math.ceil(n / ADAM8BIT_BLOCK))
    return total


def optimizer_step_bytes(p: Params, optimizer: str, device: str) -> float:
    """Temporaries the optimizer step allocates (docs/memory.md, "Measured against the plan"). AdamW runs the step
    ``train/defaults.adamw_step`` names for the device: on the CPU torch's foreach step, measured there at the larger
    of 8 B per value of the largest tensor and 3 B per parameter; on CUDA the fused step, one kernel that updates the
    parameters and both moments in place: 0 (torch's foreach step would allocate 4 B/param there, the
    ``_foreach_sqrt`` of every second moment). bitsandbytes' 8-bit AdamW: on the CPU it dequantises both states of
    one tensor at a time, 20 B (five fp32 values) per value of the largest tensor; on a GPU its blockwise kernel
    updates in place: 0. The CUDA figures are the kernels' design, not measured (no GPU was lent to this task)."""
    if not p.tensors:
        return 0.0
    if optimizer == "adamw":
        return max(8.0 * p.largest, 3.0 * p.count) if adamw_step(device) == "foreach" else 0.0
    return 20.0 * p.largest if device == "cpu" else 0.0


def frozen_bytes(p: Params, dtype: str) -> float:
    """Storage of frozen tensors. Linear weights: fp32 4 B, bf16 2 B, fp8 1 B + one fp32 scale per output row,
    nf4/fp4 0.5 B + the bitsandbytes double-quantised absmax (1 B per 64 weights + 4 B per 64 * 256 weights).
    Norm weights (1-D) and other tensors no matmul reads stay fp32, 4 B, in every storage (``frozen.freeze`` only
    replaces linear layers; an earlier plan counted them at 2 B)."""
    total = 0.0
    for s, mm in p.tensors:
        n = numel(s)
        if not mm or dtype in ("fp32", "bf16"):
            total += n * (4 if dtype == "fp32" or not mm else 2)
        elif dtype == "fp8":
            total += n + 4 * s[0]
        else:  # nf4, fp4
            blocks = math.ceil(n / NF4_BLOCK)
            total += n / 2 + blocks + 4 * math.ceil(blocks / NF4_DQ_BLOCK)
    return total


def trainable_bytes(p: Params, head: Params, precision: str, optimizer: str, device: str = "cuda") -> dict[str, float]:
    """weights, gradients, optimizer state and master weights of trainable ``p`` (``head``: the part of ``p``
    that is the LM head, which fp8 training keeps in bf16 on a GPU and in fp32, uncast, on the CPU)."""
    grads = 4.0 * p.count
    opt = optimizer_bytes(p, optimizer)
    if precision == "fp32":
        return {"weights": 4.0 * p.count, "gradients": grads, "optimizer": opt, "master": 0.0}
    if precision == "fp8":
        copies = 1.0 * (p.matmul - head.matmul) + (2.0 * head.matmul if device == "cuda" else 0.0)
    else:
        copies = 2.0 * p.matmul  # autocast's cached cast of each weight, kept for backward
    return {"weights": copies, "gradients": grads, "optimizer": opt, "master": 4.0 * p.count}


IN_FLIGHT_BLOCKS = 2  # FSDP2: the block computing, whole, and the next one being gathered (or reduce-scattered)


def sharded_rows(
    rows: dict[str, float], sharded: Params, block: Params, precision: str, optimizer: str, device: str, shards: int
) -> dict[str, float]:
    """One rank's ``rows`` (``trainable_bytes``) when the ``sharded`` part of them is split over ``shards`` ranks by
    FSDP2 (``train/distributed.py``): 1/shards of its fp32 weights, gradients and optimizer state, plus
    ``IN_FLIGHT_BLOCKS`` whole blocks in flight, their weights in the compute dtype (bf16 under bf16: FSDP2 gathers
    them already cast, so no autocast copy is kept) and their fp32 gradients before the reduce-scatter. The rest
    (the ends) is whole on every rank."""
    whole = trainable_bytes(sharded, Params(), precision, optimizer, device)
    out = {k: rows[k] - whole[k] for k in rows}
    part = {k: v / shards for k, v in whole.items()}
    fp32 = precision == "fp32"
    part["weights"] = (part["weights"] if fp32 else 0.0) + IN_FLIGHT_BLOCKS * (4 if fp32 else 2) * block.count
    part["gradients"] += IN_FLIGHT_BLOCKS * 4 * block.count
    return {k: out[k] + part[k] for k in out}


# ----------------------------------------------------------------------------------------------------------------
# Activations per token


@dataclass(frozen=True)
class ActDtypes:
    """Bytes per value of what a block saves: the residual stream and norms, what matmuls produce, what each
    linear layer saves of its input, and whether linears reading one tensor share it (fp32) or each keep a cast."""

    residual: int
    compute: int
    linear_in: int
    shared: bool
    head_in: int | None = None  # what the LM head saves of its input (None: linear_in); fp8 leaves the head alone

    @staticmethod
    def of(precision: str, device: str = "cuda") -> ActDtypes:
        if precision == "fp32":
            return ActDtypes(4, 4, 4, True)
        if precision == "fp8":
            # GPU: bf16 autocast around fp8 block linears, the head a bf16 matmul. CPU: the emulation runs without
            # autocast, so matmul outputs are fp32 and the head an fp32 matmul reading its fp32 input.
            return ActDtypes(4, 2, 1, False, 2) if device == "cuda" else ActDtypes(4, 4, 1, False, 4)
        return ActDtypes(4, 2, 2, False)


def block_bytes_per_token(
    model: ModelConfig, attn: AttentionConfig, seq_len: int, dt: ActDtypes, lora_rank: int = 0
) -> float:
    """Bytes one block saves for backward per token (its own input included), the attention on a CUDA device.

    With r, c, l the residual, compute and linear-input bytes (fp32: 4, 4, 4; bf16: 4, 2, 2; fp8: 4, 2, 1):
    norms save their input and the normalised value (2 r d each), each linear its input (l d; in fp32 q, k and v
    share one tensor, under autocast each keeps a cast), sdpa/flash/xformers save q, k, v, the output and a
    logsumexp per head (c (H D + 2 Hkv D) + c H D + 4 H), the SwiGLU its gate, silu, up and product (4 c F); the
    reference backend saves the fp32 (T, T) probabilities instead of a logsumexp, and q, k, v in fp32 per head.
    """
    d, H, D, Hkv, F = model.d_model, model.n_heads, model.head_dim, model.kv_heads, model.ffn_dim
    r, c, li = dt.residual, dt.compute, dt.linear_in
    norms = 2 * (2 * r * d)  # attn_norm and mlp_norm: input and normalised value each
    n_in = 1 if dt.shared else 3  # q, k, v (or q, kv_down, k_rope) read the attention norm's output
    o_in = 0 if li == c else li * H * D  # o reads the attention output: the same tensor unless fp8-cast
    down_in = c * F if li == c else li * F
    mlp = (1 if dt.shared else 2) * li * d + 3 * c * F + down_in
    if attn.kind == "linear":
        # computed in fp32 whatever the precision: q, k, v, their features and rotated features, the output,
        # and per chunk the masked (c, c) score and normaliser matrices.
        qkv = H * D + 2 * Hkv * D
        att = 4 * (qkv + (H * D + Hkv * D) * 2 + H * D + 2 * H * LINEAR_CHUNK) + c * H * D
    elif attn.kind == "mla":
        C, R = attn.mla_kv_rank(model), attn.mla_rope_dim(model)
        latent = c * C + r * C + (1 if dt.shared else 2) * li * C  # kv_down out, its norm, k_up/v_up inputs
        if attn.q_rank is not None:
            latent += c * attn.q_rank + r * attn.q_rank + li * attn.q_rank
        att = latent + c * (2 * H * (D + R) + H * D) + c * H * D + 4 * H + o_in
    else:
        att = c * (H * D + 2 * Hkv * D) + c * H * D + 4 * H + o_in
    if attn.kind != "linear" and attn.backend == "reference":
        # explicit softmax: fp32 q, k and v per query head, and the (H, T, T) probabilities
        att += 4 * 3 * H * D + 4 * H * seq_len - c * (H * D + 2 * Hkv * D) - 4 * H
    lora = 0.0
    if lora_rank:
        # A LoRA base (train/lora.py: y = base(x) + s B(A x) on every linear layer): the frozen norm weights need no
        # gradient, so each norm saves only its input; each adapter saves A(x) for B's backward. What a linear
        # saves of its input (counted above) is now the adapter's, for A's gradient; the base keeps its weight only
        # (``dequantised_block_bytes``).
        norms = 2 * r * d
        lora = c * lora_rank * sum(1 for s in block_shapes(model, attn).values() if len(s) == 2)
    return norms + n_in * li * d + att + mlp + lora


def dequantised_block_bytes(model: ModelConfig, attn: AttentionConfig, dt: ActDtypes, storage: str) -> float:
    """What one block of bf16 or fp8 ``FrozenLinear`` layers (a LoRA base, a right-to-left suffix) keeps for its
    backward: each layer dequantises its weight to its input's dtype and ``F.linear`` keeps that weight to
    differentiate through. Computing in fp32 (c = 4) that is a 4-byte copy of every weight. Under autocast (c = 2)
    a 2-byte cast of every weight, except that a bf16-stored ``o`` or ``down`` reads a bf16 matmul output and keeps
    the stored weight itself (no new bytes); an fp8 weight is always decoded into a new tensor."""
    total = 0.0
    for name, shape in block_shapes(model, attn).items():
        reused = storage == "bf16" and dt.compute == 2 and name in ("attn.o.weight", "mlp.down.weight")
        if len(shape) == 2 and not reused:
            total += dt.compute * numel(shape)
    return total


def head_bytes_per_token(model: ModelConfig, dt: ActDtypes) -> float:
    """The final norm (input, normalised value), the head's input, and the loss: the (B, T, vocab) logits, their
    fp32 log-softmax (kept for backward) and its gradient are live together, 12 B per logit whatever the
    precision (fp32: 3 x 4 B; bf16: 2 B logits + a 2 B shifted copy + 4 B fp32 copy + 4 B log-softmax)."""
    head_in = dt.linear_in if dt.head_in is None else dt.head_in
    return 2 * dt.residual * model.d_model + head_in * model.d_model + LOSS_BYTES_PER_LOGIT * model.vocab_size


def inference_bytes_per_token(model: ModelConfig, attn: AttentionConfig, seq_len: int, c: int = 4) -> float:
    """The largest set of tensors live at once in a no-grad forward: the residual and its update, plus the larger
    of the attention's (normed input, q, k, v, output) and the MLP's (normed input, silu, up, product)."""
    d, H, D, Hkv, F = model.d_model, model.n_heads, model.head_dim, model.kv_heads, model.ffn_dim
    att = d + 2 * H * D + 2 * Hkv * D + (H * seq_len if attn.backend == "reference" else 0)
    return c * (2 * d + max(att, d + 3 * F))


# ----------------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Stage:
    """One stage's bytes by kind (``KINDS``), what it holds, and its FLOPs per token."""

    name: str
    variant: str  # which case of the stage this is (e.g. "leftmost" or "cached" for train-stack-l2r)
    what: str  # one line: what is on the device
    bytes: dict[str, int]  # kind -> bytes, every kind of KINDS
    device_bytes: int
    params_trainable: int
    params_frozen: int
    activation_checkpointing: bool
    batch_size: int
    seq_len: int
    flops_per_token: float
    tokens_per_day: float
    # One optimizer step runs grad_accum micro-batches of batch_size x seq_len tokens: the bytes above are one
    # micro-batch's (only one is live at a time), the tokens and FLOPs here the whole step's.
    grad_accum: int = 1
    tokens_per_step: int = 0
    flops_per_step: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.device_bytes

    def to_data(self) -> dict:
        data = asdict(self)
        data.update(total_bytes=self.total_bytes, fits=self.fits)
        return data


@dataclass
class Plan:
    recipe: str
    device_bytes: int
    options: PlanOptions
    params: dict[str, int]
    stages: list[Stage]  # one per STAGES entry: the worst variant of each
    variants: list[Stage]  # every variant planned (the stages among them), e.g. both train-stack-l2r cases
    cache_disk_bytes_per_billion_tokens: dict[str, int]  # cache dtype -> bytes on disk per 1e9 cached tokens
    cache_dtype: str  # the recipe's

    def stage(self, name: str, variant: str | None = None) -> Stage:
        """The stage ``name`` as planned (its worst variant), or its variant ``variant``."""
        for s in self.stages if variant is None else self.variants:
            if s.name == name and (variant is None or s.variant == variant):
                return s
        known = ", ".join(f"{s.name}/{s.variant}" for s in self.variants)
        raise StackwiseError(f"no stage {name!r}{f' variant {variant!r}' if variant else ''}; planned: {known}")

    def to_data(self) -> dict:
        return {
            "recipe": self.recipe,
            "device_bytes": self.device_bytes,
            "options": asdict(self.options),
            "params": self.params,
            "cache_dtype": self.cache_dtype,
            "cache_disk_bytes_per_billion_tokens": self.cache_disk_bytes_per_billion_tokens,
            "stages": [s.to_data() for s in self.stages],
            "variants": [s.to_data() for s in self.variants],
        }


def cache_bytes_per_token(d_model: int, dtype: str) -> float:
    """One cached hidden state: d_model values of 2 B (bf16) or 4 B (fp32), or 1 B (fp8) + one fp32 scale."""
    return d_model * {"bf16": 2, "fp32": 4}[dtype] if dtype != "fp8" else d_model + 4


def plan(recipe: Recipe, device_bytes: int, options: PlanOptions | None = None) -> Plan:
    """Bytes by kind, fit on ``device_bytes`` and FLOPs per token for every stage in ``STAGES``."""
    o = options or PlanOptions()
    if device_bytes <= 0:
        raise StackwiseError(f"device bytes must be > 0, got {device_bytes}")
    m, at, rk = recipe.model, recipe.attention, recipe.rack
    if m.family != "llama":
        # The shapes and saved tensors below are the llama block's (RMSNorm, SwiGLU, no biases, RoPE).
        raise StackwiseError(f"bench plan models the llama family only for now, got model.family {m.family!r}")
    B = o.batch_size or recipe.train.batch_size
    G = o.grad_accum or recipe.train.grad_accum
    T = o.seq_len or recipe.data.seq_len
    n_tok = B * T  # one micro-batch: what the activations hold
    S = o.shards
    n_rank = -(-B // S) * T  # under torchrun each rank trains its slice of the micro-batch (distributed.local_rows)
    k, n_stacks = rk.blocks_per_stack, rk.stacks
    L = k * n_stacks

    block = Params.of(block_shapes(m, at).values())
    ends = ends_shapes(m)
    embed = Params.of([ends["embed.weight"]], matmul=m.tie_embeddings)  # a lookup, unless it is the head
    norm = Params.of([ends["norm.weight"]])
    head = Params.of([ends["head.weight"]]) if "head.weight" in ends else Params()
    out_ends = norm + head  # final norm + head (with tied embeddings the head is the embedding)
    time = Params.of(time_shapes(m).values())  # each stack's time network (diffusion with t as input)
    stack = Params.of([s for s, _ in block.tensors], k) + time
    head_mm = m.vocab_size * m.d_model  # the logits matmul, tied or not

    dt = ActDtypes.of(o.precision, o.device)
    a_block = block_bytes_per_token(m, at, T, dt) * n_rank
    a_in = dt.residual * m.d_model * n_rank  # what a checkpointed block keeps: its input
    a_head = head_bytes_per_token(m, dt) * n_rank
    fs = FlopShapes.of(recipe, T)
    # train/finetune.py checkpoints every block of a fine-tune when train.finetune_checkpointing says so (the default)
    ft_ckpt = recipe.train.finetune_checkpointing
    ckpt_default = {"fuse-full": ft_ckpt, "fuse-lora": ft_ckpt, "fuse-qlora": ft_ckpt}

    def ckpt(name: str) -> bool:
        return o.activation_checkpointing if o.activation_checkpointing is not None else ckpt_default.get(name, False)

    def blocks_and_head_act(n: int, on: bool, a_blk: float, a_inp: float, a_hd: float, frozen_ckpt: int = 0) -> float:
        # Without checkpointing every block keeps everything, and all of it is still live at the loss, with the
        # head's. With it each block keeps its input, and one block at a time is recomputed during backward, after
        # the head and the loss have freed theirs: the peak is the larger of the two moments, not their sum
        # (measured, docs/memory.md "Measured against the plan"). ``frozen_ckpt`` blocks are always checkpointed.
        if not on and not frozen_ckpt:
            return n * a_blk + a_hd
        return (n * a_inp if on else n * a_blk) + frozen_ckpt * a_inp + max(a_hd, a_blk - a_inp)

    def make(
        name: str,
        variant: str,
        what: str,
        trainable: Params,
        frozen_rows: float,
        act: float,
        buffers: float,
        flops: float,
        *,
        frozen_count: int,
        on: bool,
        head_part: Params = head,
        precision: str = o.precision,
        notes: list[str] | tuple[str, ...] = (),
        sharded: Params | None = None,
    ) -> Stage:
        rows = trainable_bytes(trainable, head_part, precision, o.optimizer, o.device)
        if S > 1 and sharded is not None and sharded.count:
            rows = sharded_rows(rows, sharded, block, precision, o.optimizer, o.device, S)
            notes = [
                *notes,
                f"per rank of {S} (torchrun, FSDP2): the blocks' weights, gradients and optimizer state 1/{S} each "
                f"+ {IN_FLIGHT_BLOCKS} blocks whole in flight; the ends whole on every rank; activations of "
                f"{-(-B // S)} of the {B} sequences; tokens/day of all {S} ranks",
            ]
        elif S > 1 and sharded is not None:  # lora, qlora: the ranks share the batch, each holds the whole model
            notes = [
                *notes,
                f"per rank of {S} (torchrun): the base and the adapters whole on every rank; activations of "
                f"{-(-B // S)} of the {B} sequences; tokens/day of all {S} ranks",
            ]
        if S > 1 and sharded is not None and B % S:
            notes.append(
                f"a micro-batch of {B} does not split over {S} ranks (torchrun refuses it): pass "
                f"--batch-size {S * -(-B // S)} (train.batch_size) and fewer train.grad_accum"
            )
        elif S > 1 and sharded is None:
            notes = [*notes, "one process: not sharded under torchrun"]
        # The step runs after backward has freed the activations: its temporaries count only beyond them.
        rows["optimizer"] += max(0.0, optimizer_step_bytes(trainable, o.optimizer, o.device) - act)
        rows.update(activations=act, frozen=frozen_rows, cache_buffers=buffers, headroom=o.headroom_bytes)
        return Stage(
            name=name,
            variant=variant,
            what=what,
            bytes={kind: int(round(rows[kind])) for kind in KINDS},
            device_bytes=device_bytes,
            params_trainable=trainable.count,
            params_frozen=frozen_count,
            activation_checkpointing=on,
            batch_size=B,
            seq_len=T,
            flops_per_token=flops,
            tokens_per_day=o.tflops * 1e12 * 86400 / flops * (S if sharded is not None else 1),
            grad_accum=G,
            tokens_per_step=G * n_tok,
            flops_per_step=flops * G * n_tok,
            notes=list(notes),
        )

    stages = []

    # --- train-stack: each training stage as train/stage.py defines it, the definition train-stack builds its
    # modules from. Left to right: the leftmost stack (from the tokens, trains the embedding) and a later one (from
    # its cache, or the rightmost recomputing its whole prefix without grad), the worse of the two planned. Right to
    # left: the new leftmost stack in front of the whole trained suffix, the gradient passing through it, each
    # suffix block checkpointed. The frozen stacks (prefix, suffix) are stored in the plan's frozen dtype, the
    # frozen ends in fp32.
    defs = planned(recipe)
    fd = o.frozen_dtype

    def frozen_stacks(blocks: tuple[int, ...]) -> Params:
        return Params.of([s for s, _ in block.tensors], sum(blocks)) + Params(time.tensors * len(blocks))

    def describe(st: StageDef) -> str:
        what = f"stack at rack position {st.position} ({k} block(s))"
        if st.name == "train-stack-r2l":
            what = f"new leftmost stack ({k} block(s))"
        ends_part = (" + embedding" if st.embedding_trains else "") + (" + final norm + head" if st.head_trains else "")
        source = {
            "tokens": "input from the tokens",
            "cache": "input read from its cache",
            "recompute": f"its {sum(st.prefix)}-block prefix frozen in {fd} and recomputed without grad on every batch",
        }[st.source]
        if st.suffix:
            source = f"{sum(st.suffix)} suffix block(s) frozen in {fd}, checkpointed"
        return f"{what}{ends_part} trainable; {source}"

    def train_stage(st: StageDef) -> Stage:
        on = ckpt(st.name)
        trains = stack + (embed if st.embedding_trains else Params()) + (out_ends if st.head_trains else Params())
        frozen_ends = (Params() if st.embedding_trains else embed) + (Params() if st.head_trains else out_ends)
        held = frozen_stacks(st.prefix + st.suffix)
        frozen = frozen_bytes(frozen_ends, "fp32") + (frozen_bytes(held, fd) if held.count else 0.0)
        act = blocks_and_head_act(k, on, a_block, a_in, a_head, sum(st.suffix))
        buffers = 0.0
        if st.source != "tokens":  # block 0's input is the cache buffer, or the prefix's output beside its tensors
            act -= a_in
            buffers = 4.0 * m.d_model * n_rank if st.source == "cache" else inference_bytes_per_token(m, at, T) * n_rank
        notes = []
        if st.suffix and fd in ("nf4", "fp4"):
            # bitsandbytes keeps the 4-bit weight for backward and dequantises one layer at a time: to the autocast
            # dtype on a GPU, to fp32 on the CPU.
            frozen += (4 if o.device == "cpu" else dt.compute) * block.largest
            notes.append(f"includes one dequantised {fd} layer")
        elif st.suffix and fd in ("bf16", "fp8"):
            # FrozenLinear dequantises to the input's dtype and F.linear keeps that weight (or autocast's 2-byte cast
            # of it) for backward: a whole block's weights while it is recomputed.
            frozen += dequantised_block_bytes(m, at, dt, fd)
            notes.append(f"includes one block's {fd} weights dequantised for its backward")
        return make(
            st.name,
            st.variant,
            describe(st),
            trains,
            frozen,
            act,
            buffers,
            stage_flops(replace(st, checkpointing=on), fs),
            frozen_count=frozen_ends.count + held.count,
            on=on,
            sharded=stack,
            notes=notes,
        )

    l2r = [train_stage(st) for st in defs if st.name == "train-stack-l2r"]
    variants = list(l2r)
    stages.append(max(l2r, key=lambda s: s.total_bytes))
    stages.extend(train_stage(st) for st in defs if st.name == "train-stack-r2l")

    # --- cache: a no-grad fp32 forward (train/cache.py) with cache.batch_size sequences. From the tokens (at any
    # position p >= 1) the shard's states stay on the host and the prefix streams through the device one stack at a
    # time: the ends + one stack, one batch there and back, p stack passes of FLOPs. Incremental (position >= 2, the
    # left neighbour's cache fresh): one stack on the cache before it, the same bytes and one stack pass. Diffusion
    # time-as-depth (each stack's input has its own mask ratio) and fp8 caches (no rounding on rounding) always run
    # from the tokens. The worse of the two is planned.
    name = "cache"
    Bc = recipe.cache.batch_size
    inf = inference_bytes_per_token(m, at, T) * Bc * T
    hbuf = 4.0 * m.d_model * Bc * T  # one (B, T, d) fp32 batch on the device
    deepest = max(1, n_stacks - 1)  # from the tokens, the last stack's cache runs the most stacks
    flops_tokens = cache_flops_per_token(fs, [k] * deepest)
    flops_incremental = cache_flops_per_token(fs, [k])
    all_ends = embed + out_ends
    from_tokens = make(
        name,
        "from-tokens",
        f"cache entering position p >= 1 from the tokens: the ends + one stack in fp32, streamed, no grad; FLOPs at "
        f"p = {deepest} (p stack passes)",
        Params(),
        frozen_bytes(stack + all_ends, "fp32"),
        inf,
        2 * hbuf,
        flops_tokens,
        frozen_count=(stack + all_ends).count,
        on=False,
    )
    incremental = make(
        name,
        "incremental",
        "cache entering position >= 2: one stack in fp32 on the cache before it, no grad",
        Params(),
        frozen_bytes(stack, "fp32"),
        inf,
        2 * hbuf,
        flops_incremental,
        frozen_count=stack.count,
        on=False,
        notes=["a cache whose left neighbour's cache is missing or stale runs from the tokens through every stack"],
    )
    for st in (from_tokens, incremental):  # one forward pass of cache.batch_size sequences: no optimizer step
        st.batch_size, st.grad_accum, st.tokens_per_step = Bc, 1, Bc * T
        st.flops_per_step = st.flops_per_token * Bc * T
    # train/cache.py never runs incrementally for these: each stack's input is masked at its own ratio, or an fp8
    # cache would add one e4m3 rounding per stack.
    only_tokens = objective_kind(recipe.objective).ratio_per_stack(recipe) or recipe.cache.dtype == "fp8"
    cache_variants = [from_tokens, incremental] if n_stacks > 2 and not only_tokens else [from_tokens]
    variants += cache_variants
    stages.append(max(cache_variants, key=lambda s: s.total_bytes))

    # --- fuse with fine-tuning, and end-to-end training: the whole model at once. A fine-tune computes in fp32 or
    # under bf16 autocast (train/finetune.py): a plan in fp16 or fp8 plans its fuse stages in bf16.
    blocks_all = Params.of([s for s, _ in block.tensors], L) + Params(time.tensors * n_stacks)
    every = blocks_all + all_ends
    fp = o.precision if o.precision in FINETUNE_PRECISIONS else "bf16"
    fdt = ActDtypes.of(fp, o.device)
    f_block = block_bytes_per_token(m, at, T, fdt) * n_rank
    f_in = fdt.residual * m.d_model * n_rank
    f_head = head_bytes_per_token(m, fdt) * n_rank
    whole = next(st for st in defs if st.end_to_end)
    e2e_frozen = Params() if whole.embedding_trains else embed
    for name, what, prec, acts in (
        ("fuse-full", "the whole fused model trainable", fp, (f_block, f_in, f_head)),
        ("end-to-end", "the whole model trained at once (the baseline)", o.precision, (a_block, a_in, a_head)),
    ):
        on = ckpt(name)
        if name == "fuse-full":
            trains, frozen, flops = every, Params(), whole_model_flops_per_token(fs, L, n_stacks, checkpointing=on)
        else:  # train/stage.py's end-to-end stage: the embedding frozen with train.embedding: frozen
            trains = blocks_all + (embed if whole.embedding_trains else Params()) + out_ends
            frozen, flops = e2e_frozen, stage_flops(replace(whole, checkpointing=on), fs)
        stages.append(
            make(
                name,
                "whole",
                what,
                trains,
                frozen_bytes(frozen, "fp32") if frozen.count else 0.0,
                blocks_and_head_act(L, on, *acts),
                0.0,
                flops,
                frozen_count=frozen.count,
                on=on,
                precision=prec,
                sharded=blocks_all,
            )
        )

    # LoRA: adapters A (r, in) and B (out, r) on every linear layer of every block (attention included), as
    # train/finetune.py runs it by default: the base's block linears frozen in FINETUNE_BASE_STORAGE (bf16
    # FrozenLinear or bitsandbytes NF4), the norms and the ends (embedding, final norm, head) frozen in fp32, the
    # residual stream fp32, the matmuls in the fine-tune's precision.
    r = o.lora_rank
    adapters = Params.of(
        [shape for s, mm in block.tensors if mm for shape in ((r, s[1]), (s[0], r))],
        L,
    )
    la_block = block_bytes_per_token(m, at, T, fdt, r) * n_rank
    for name, mode in (("fuse-lora", "lora"), ("fuse-qlora", "qlora")):
        base_dtype = FINETUNE_BASE_STORAGE[mode]
        on = ckpt(name)
        norms = Params(tuple(t for t in blocks_all.tensors if not t[1]))
        linears = Params(tuple(t for t in blocks_all.tensors if t[1]))
        base_bytes = frozen_bytes(linears, base_dtype) + frozen_bytes(norms + all_ends, FINETUNE_ENDS_DTYPE)
        if base_dtype == "nf4":
            # bitsandbytes keeps the 4-bit weight for backward and dequantises one layer at a time: to the compute
            # dtype on a GPU, to fp32 on the CPU.
            note = f"includes one dequantised {base_dtype} layer"
            base_bytes += (4 if o.device == "cpu" else fdt.compute) * block.largest
        else:
            # FrozenLinear dequantises its weight to the input's dtype (fp32) and F.linear keeps it, or autocast's
            # 2-byte cast of it, for backward: every block's without checkpointing, one block's with it.
            note = f"includes the {base_dtype} weights of {'one block' if on else 'every block'} dequantised"
            base_bytes += (1 if on else L) * dequantised_block_bytes(m, at, fdt, base_dtype)
        if not fdt.shared:  # autocast casts the frozen fp32 head (or tied embedding) for its matmul, and keeps it
            base_bytes += 2 * head_mm
        flops = lora_flops_per_token(fs, L, n_stacks, adapters.count, checkpointing=on)
        stages.append(
            make(
                name,
                "whole",
                f"LoRA rank {r} on every linear layer; base frozen in {base_dtype} (norms and ends "
                f"{FINETUNE_ENDS_DTYPE}), compute {fp}",
                adapters,
                base_bytes,
                blocks_and_head_act(L, on, la_block, f_in, f_head),
                0.0,
                flops,
                frozen_count=every.count,
                on=on,
                sharded=Params(),  # under torchrun nothing is sharded: the ranks share the batch
                head_part=Params(),
                precision=fp,
                notes=[note],
            )
        )

    order = {n: i for i, n in enumerate(STAGES)}
    stages.sort(key=lambda s: order[s.name])
    variants += [s for s in stages if s not in variants]
    variants.sort(key=lambda s: order[s.name])
    disk = {dt_: int(round(cache_bytes_per_token(m.d_model, dt_) * 1e9)) for dt_ in CACHE_DTYPES}
    return Plan(
        recipe=recipe.name,
        device_bytes=device_bytes,
        options=o,
        params=param_counts(recipe),
        stages=stages,
        variants=variants,
        cache_disk_bytes_per_billion_tokens=disk,
        cache_dtype=recipe.cache.dtype,
    )
