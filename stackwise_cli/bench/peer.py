"""The independent peer of a comparison, and the one evaluator every arm is scored with.

The peer is the recipe's model shape as a Hugging Face ``transformers`` model (``LlamaForCausalLM``, config from
``model/hf.hf_config``), trained by a plain torch loop that shares no code with stackwise's trainer: AdamW with the
recipe's lr, betas and weight decay (matrices only), linear warmup then cosine decay to ``lr * min_lr_ratio``, the
recipe's batch size, grad accumulation and gradient clipping, on random windows of the train token stream. It shows
how stackwise's own end-to-end baseline compares with an ordinary training loop of the same model.

The evaluator is Hugging Face's forward too, on the first N val sequences of the data project:

- next-token models (clm): the mean next-token cross-entropy, every position but the first, for any folder
  ``AutoModelForCausalLM`` loads (an arm's ``fused/``, the peer);
- masked models (mlm, diffusion): the cross-entropy at masked positions of masks drawn here, from the seed and the
  ratio alone (``eval_masks``: the same positions for every arm, whatever each arm trained at), every masked
  position reading ``[MASK]``. mlm: the mean at one ratio (``eval.mask_ratio``). diffusion: the ELBO bound, as
  ``stackwise eval`` defines it, the mean over a grid of t of the masked loss summed over a sequence's positions
  and divided by t, per position. The model is ``AutoModelForMaskedLM`` (bert's ``fused/``) or, for a llama
  diffusion rack, which no transformers class computes bidirectionally, ``LlamaForCausalLM`` holding its weights
  with a full attention mask (every position sees every other one).

For masked objectives the peer is ``AutoModelForMaskedLM`` trained on masks it draws itself (BERT's: each
position selected with probability ``mask.ratio``, 80% ``[MASK]``, 10% a random token, 10% kept).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stackwise_cli.model.hf import hf_config
from stackwise_cli.recipe import Recipe, TrainRecipe


def _from_config(auto, model_cfg, n_layers: int, eos_id: int, pad_id: int | None) -> torch.nn.Module:
    """A ``transformers`` model (``auto``: an ``AutoModelFor...`` class) of the export's config, fp32."""
    from transformers import AutoConfig

    cfg = hf_config(model_cfg, n_layers, eos_id, pad_id)
    cfg.pop("architectures")
    return auto.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).float()


def _from_pretrained(auto, folder: Path) -> torch.nn.Module:
    """A Hugging Face folder loaded with ``auto``, fp32, in eval mode."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr is the command's progress; the load bar is noise there
    return auto.from_pretrained(folder).float().eval()


def peer_model(recipe: Recipe, eos_id: int, pad_id: int | None, seed: int) -> torch.nn.Module:
    """A freshly initialised ``transformers`` model of the recipe's whole planned shape (every stack's blocks): a
    causal LM for clm, a masked LM for mlm."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    n_layers = recipe.rack.stacks * recipe.rack.blocks_per_stack
    torch.manual_seed(seed)  # HF initialises from the global generator: normal(0, initializer_range)
    auto = AutoModelForCausalLM if recipe.objective == "clm" else AutoModelForMaskedLM
    return _from_config(auto, recipe.model, n_layers, eos_id, pad_id)


def warm_up(device: torch.device) -> None:
    """Two training steps of a tiny model: the first use of torch's kernels, thread pools and optimizer, so
    that what they set up once is not counted as a measured stage's memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.zeros(2, 16, dtype=torch.long, device=device)
    for _ in range(2):
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def lr_at(step: int, tr: TrainRecipe, steps: int) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` to ``lr * min_lr_ratio`` at the last step."""
    if step < tr.warmup_steps:
        return tr.lr * (step + 1) / tr.warmup_steps
    progress = min((step - tr.warmup_steps) / max(1, steps - tr.warmup_steps), 1.0)
    floor = tr.lr * tr.min_lr_ratio
    return floor + (tr.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.inference_mode()
def next_token_loss(model: torch.nn.Module, tokens: np.ndarray, batch_size: int, device: torch.device) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` on ``tokens`` (N, T): positions 1..T-1 of every row."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for lo in range(0, len(tokens), batch_size):
        x = torch.from_numpy(tokens[lo : lo + batch_size].astype(np.int64)).to(device)  # (B, T)
        logits = model(input_ids=x).logits.float()  # (B, T, V)
        total += float(
            F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        )
        count += x[:, 1:].numel()
    model.train(was_training)
    return total / max(count, 1)


# --- masked objectives --------------------------------------------------------------------------------------------


def eval_masks(shape: tuple[int, int], ratio: float, seed: int = 0) -> np.ndarray:
    """(N, T) bools: ``max(1, round(ratio * T))`` positions of each row, drawn uniformly without replacement from
    ``seed`` and ``ratio`` alone, so every arm is scored at the same positions."""
    n, length = shape
    k = min(length, max(1, round(ratio * length)))
    rng = np.random.default_rng([seed, round(ratio * 1_000_000)])
    order = np.argsort(rng.random((n, length)), axis=1)
    masks = np.zeros((n, length), dtype=bool)
    np.put_along_axis(masks, order[:, :k], True, axis=1)
    return masks


@dataclass(frozen=True)
class MaskedScoring:
    """How a masked arm is scored: mlm at one ratio; diffusion the ELBO bound over a grid of t."""

    mask_id: int
    ratios: tuple[float, ...]
    elbo: bool

    @staticmethod
    def of(objective: str, mask_id: int, mask_ratio: float, elbo_points: int) -> MaskedScoring:
        if objective == "diffusion":
            return MaskedScoring(mask_id, tuple((i + 0.5) / elbo_points for i in range(elbo_points)), True)
        return MaskedScoring(mask_id, (mask_ratio,), False)


LogitsOf = Callable[[torch.Tensor], torch.Tensor]  # input ids (B, T) -> logits (B, T, V)


@torch.inference_mode()
def masked_loss(logits_of: LogitsOf, tokens: np.ndarray, how: MaskedScoring, batch_size: int, device) -> float:
    """mlm: the mean cross-entropy (nats) over the masked positions at ``how.ratios[0]``. diffusion: the ELBO bound,
    the mean over ``how.ratios`` (the t grid) of the masked positions' summed cross-entropy over t, per position."""
    terms = []
    for ratio in how.ratios:
        masks = eval_masks(tokens.shape, ratio)
        total, count = 0.0, 0
        for lo in range(0, len(tokens), batch_size):
            x = torch.from_numpy(tokens[lo : lo + batch_size].astype(np.int64)).to(device)  # (B, T)
            sel = torch.from_numpy(masks[lo : lo + batch_size]).to(device)
            logits = logits_of(x.masked_fill(sel, how.mask_id)).float()  # (B, T, V)
            total += float(F.cross_entropy(logits[sel], x[sel], reduction="sum").double())
            count += int(sel.sum())
        terms.append(total / ratio / tokens.size if how.elbo else total / max(count, 1))
    return sum(terms) / len(terms)


def hf_logits(model: torch.nn.Module, bidirectional_mask: bool = False) -> LogitsOf:
    """A Hugging Face model's logits; ``bidirectional_mask``: a full 4-D attention mask (True: attend), which makes
    a causal class attend both ways."""

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        if bidirectional_mask:
            mask = torch.ones(x.shape[0], 1, x.shape[1], x.shape[1], dtype=torch.bool, device=x.device)
        else:
            mask = torch.ones_like(x)
        return model(input_ids=x, attention_mask=mask).logits

    return logits_of


def bidirectional_llama(rack, eos_id: int, pad_id: int | None) -> torch.nn.Module:
    """A llama rack trained bidirectionally (diffusion) in transformers' ``LlamaForCausalLM``, for ``hf_logits``
    with its full mask: the weights as the export names them (``model/hf.hf_state_dict``), fp32 on the CPU."""
    from transformers import AutoModelForCausalLM

    from stackwise_cli.model.hf import hf_state_dict, total_blocks

    model = _from_config(AutoModelForCausalLM, rack.cfg, total_blocks(rack), eos_id, pad_id)
    # the HF class is causal: it holds the weights, the 4-D mask makes it attend as the rack was trained
    state = {k: v.detach().float().cpu() for k, v in hf_state_dict(rack, bidirectional=False).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"the rack does not map onto LlamaForCausalLM: missing {missing[:3]}, extra {unexpected[:3]}")
    if rack.cfg.tie_embeddings:
        model.tie_weights()
    return model.eval()


def bert_masking(x: torch.Tensor, ratio: float, mask_id: int, vocab: int, gen: torch.Generator):
    """BERT's corruption, drawn here: each position selected with probability ``ratio`` (at least one a batch),
    80% of them read ``mask_id``, 10% a random token, 10% are kept; returns (inputs, labels with -100 elsewhere)."""
    sel = torch.rand(x.shape, generator=gen) < ratio
    if not bool(sel.any()):
        sel.view(-1)[torch.randint(sel.numel(), (1,), generator=gen)] = True
    roll = torch.rand(x.shape, generator=gen)
    inputs = x.clone()
    inputs[sel & (roll < 0.8)] = mask_id
    swap = sel & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = torch.randint(vocab, x.shape, generator=gen)[swap]
    return inputs, x.masked_fill(~sel, -100)


def load_masked_lm(folder: Path) -> torch.nn.Module:
    """``AutoModelForMaskedLM`` from a Hugging Face folder (bert's fused/, the masked peer), fp32, eval mode."""
    from transformers import AutoModelForMaskedLM

    return _from_pretrained(AutoModelForMaskedLM, folder)


def score_folder(
    folder: Path, tokens: np.ndarray, batch_size: int, device: torch.device, how: MaskedScoring | None = None
) -> float:
    """The evaluator on a Hugging Face folder (``fused/``, the peer's ``model/``), loaded in fp32: the next-token
    loss in ``AutoModelForCausalLM``, or with ``how`` the masked loss in ``AutoModelForMaskedLM``."""
    from transformers import AutoModelForCausalLM

    if how is not None:
        return masked_loss(hf_logits(load_masked_lm(folder).to(device)), tokens, how, batch_size, device)
    model = _from_pretrained(AutoModelForCausalLM, folder).to(device)
    return next_token_loss(model, tokens, batch_size, device)


@dataclass
class PeerRun:
    steps: int
    tokens: int  # trained on
    losses: list[float] = field(default_factory=list)  # training loss of every step
    points: list[tuple[int, float]] = field(default_factory=list)  # (step, val loss) at the eval steps


def train_peer(
    model: torch.nn.Module,
    stream: np.ndarray,
    tr: TrainRecipe,
    seq_len: int,
    steps: int,
    device: torch.device,
    eval_at: set[int] = frozenset(),
    evaluate: Callable[[torch.nn.Module], float] | None = None,
    masking: tuple[float, int, int] | None = None,
) -> PeerRun:
    """Train ``model`` for ``steps`` optimizer steps on random ``seq_len`` windows of the 1-D token ``stream``
    (seeded by ``train.seed``: the same windows every run), scoring it with ``evaluate`` after each step in
    ``eval_at``. The loss is next-token cross-entropy, or with ``masking`` = (ratio, mask id, vocab size) the
    masked-LM loss at the positions ``bert_masking`` selects (seeded too)."""
    if len(stream) < seq_len:
        raise ValueError(f"the train stream has {len(stream)} tokens, fewer than one window of {seq_len}")
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    # Weight decay on matrices only, as is usual (norm gains are left alone).
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": tr.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=tr.lr, betas=tr.betas, eps=1e-8)
    rng = np.random.default_rng(tr.seed)
    gen = torch.Generator().manual_seed(tr.seed)
    stream_t = torch.from_numpy(np.asarray(stream, dtype=np.int64))
    run = PeerRun(steps=steps, tokens=0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tr, steps)
        loss_sum = 0.0
        for _ in range(tr.grad_accum):
            starts = torch.from_numpy(rng.integers(0, len(stream) - seq_len + 1, size=tr.batch_size))
            x = stream_t[starts[:, None] + torch.arange(seq_len)].to(device)  # (B, T)
            if masking is None:
                logits = model(input_ids=x).logits  # (B, T, V)
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
            else:
                inputs, labels = bert_masking(x.cpu(), *masking, gen)
                logits = model(input_ids=inputs.to(device), attention_mask=torch.ones_like(x)).logits
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.to(device).reshape(-1))
            (loss / tr.grad_accum).backward()
            loss_sum += float(loss.detach())
            run.tokens += x.numel()
        if tr.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, tr.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run.losses.append(loss_sum / tr.grad_accum)
        if evaluate is not None and step + 1 in eval_at:
            run.points.append((step + 1, evaluate(model)))
    return run
