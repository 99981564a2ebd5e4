"""Sampling from the rack: autoregressive with a KV cache, iterative unmasking, and the time-as-depth single pass.

Three ways to turn a rack into text (see docs/generate.md):

- ``sample_autoregressive``: causal attention, one new token per forward step, each step running only the new
  position through every stack against the keys and values cached by earlier steps (``Stack.decode``).
- ``unmask_iterative``: masked diffusion sampling (MDLM / LLaDA). Start from the prompt followed by ``[MASK]``
  tokens; each step runs the whole rack bidirectionally and fills the most confident masked positions.
- ``unmask_single_pass``: time-as-depth diffusion. Stack i was trained to denoise at mask ratio ``r_i``, so one
  forward pass through the rack is the whole reverse process: after each stack the most confident masked
  positions are committed until the masked share is down to the next stack's ratio.

The pure functions here take a ``Rack`` and token ids and need no project; ``generate`` is the project-level entry
point the CLI calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from stackwise_cli.curricula import curriculum_named
from stackwise_cli.errors import ProjectError, StackwiseError
from stackwise_cli.evaluate.causal import decode_stacks, mask_probe, require_mask_id
from stackwise_cli.evaluate.trained import require_trained
from stackwise_cli.model.model import Rack
from stackwise_cli.objectives import objective_kind
from stackwise_cli.progress import QUIET, Reporter
from stackwise_cli.store.project import Project

OnStep = Callable[[], None]


# --- choosing tokens from logits --------------------------------------------------------------------------------


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Validate sampling settings: a StackwiseError naming the flag and its allowed values."""
    if not temperature >= 0 or math.isinf(temperature):
        raise StackwiseError(
            f"--temperature must be >= 0 (0 = greedy), got {temperature}", hint="e.g. --temperature 0.8"
        )
    if top_k is not None and top_k < 1:
        raise StackwiseError(f"--top-k must be >= 1, got {top_k}", hint="leave it out to keep every token")
    if top_p is not None and not 0 < top_p <= 1:
        raise StackwiseError(f"--top-p must be in (0, 1], got {top_p}", hint="e.g. --top-p 0.9; 1 keeps every token")
    if temperature == 0 and (top_k is not None or top_p is not None):
        # Greedy decoding takes the argmax, which top-k and top-p always keep: the flags would silently do nothing.
        raise StackwiseError(
            "--top-k and --top-p filter a sampling distribution, but --temperature 0 decodes greedily",
            hint="add --temperature 1.0 (or another value > 0) to sample",
        )


def restrict_vocab(logits: torch.Tensor, vocab_size: int | None = None, banned: Sequence[int] = ()) -> torch.Tensor:
    """Logits with the ids a sample must never hold set to -inf: ids >= ``vocab_size`` (embedding rows the tokenizer
    does not define, which were never trained) and the ``banned`` ids (``[MASK]``)."""
    logits = logits.float().clone()
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits[..., vocab_size:] = -math.inf
    for i in banned:
        logits[..., i] = -math.inf
    return logits


def filter_logits(
    logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """The logits of the sampling distribution: divided by ``temperature`` (> 0), then every token outside the
    ``top_k`` largest and outside the nucleus set to -inf. The nucleus (``top_p``) is the smallest set of the most
    likely tokens whose probability mass is >= ``top_p``; the most likely token is always kept.

    Applied in the order temperature, top-k, top-p (as Hugging Face ``generate`` does). Works on (..., V)."""
    assert temperature > 0, "greedy decoding (temperature 0) does not go through filter_logits"
    x = logits.float() / temperature
    if top_k is not None and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]  # (..., 1): the k-th largest
        x = x.masked_fill(x < kth, -math.inf)  # ties with the k-th are kept
    if top_p is not None and top_p < 1:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = before >= top_p  # the set is already complete without this token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, -math.inf)
    return x


def choose_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per position from logits (..., V): the argmax when ``temperature`` is 0, else a sample from
    ``filter_logits``. Returns (tokens (...), confidence (...)): the probability of the chosen token under the
    distribution it was drawn from, which is what unmasking ranks positions by."""
    if temperature == 0:
        probs = torch.softmax(logits.float(), dim=-1)
        confidence, tokens = probs.max(dim=-1)
        return tokens, confidence
    probs = torch.softmax(filter_logits(logits, top_k, top_p, temperature), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])  # multinomial wants (N, V)
    tokens = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
    confidence = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, confidence


# --- autoregressive ---------------------------------------------------------------------------------------------


@dataclass
class Continuations:
    """What ``sample_autoregressive`` made: per sample the new tokens (without the end-of-text token that stopped
    it) and whether it stopped at end-of-text (else at ``max_new_tokens``)."""

    tokens: list[list[int]]
    stopped_at_eos: list[bool]
    steps: int  # forward steps run (= new tokens of the longest sample)


@torch.inference_mode()
def sample_autoregressive(
    rack: Rack,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    samples: int = 1,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    vocab_size: int | None = None,
    banned: Sequence[int] = (),
    probe_id: int | None = None,
    on_step: OnStep | None = None,
) -> Continuations:
    """Left-to-right generation with causal attention, ``samples`` sequences in one batch.

    ``prompt_ids`` must hold at least one token (callers start an empty prompt from end-of-text). A sample stops at
    ``eos_id`` (None: never) or after ``max_new_tokens``. ``use_cache=False`` is the plain reference: every step
    recomputes the whole sequence with ``rack(tokens, causal=True)``; the cached path must give the same tokens.

    The next token is read from the last position (clm), or with ``probe_id`` (the ``[MASK]`` id: an mlm or
    diffusion rack, trained to predict the token under a mask) from a ``[MASK]`` appended at the next position:
    cached, it is decoded against the caches and dropped, and the sampled token takes its place.
    """
    assert len(prompt_ids) >= 1, "start an empty prompt from the end-of-text token"
    check_sampling(temperature, top_k, top_p)
    device = rack.ends.embed.weight.device
    seq = torch.tensor([list(prompt_ids)] * samples, dtype=torch.long, device=device)  # (B, P)
    caches = None  # per stack, from Rack.decode
    new, start = seq, 0  # the positions the next cached call runs
    out: list[list[int]] = [[] for _ in range(samples)]
    done = torch.zeros(samples, dtype=torch.bool, device=device)
    steps = 0
    for _ in range(max_new_tokens):
        if use_cache and probe_id is not None:
            _, caches = decode_stacks(rack, new, start, caches)  # the new tokens join the caches, no head read
            start += new.shape[1]
            # A [MASK] at the next position predicts it; its own keys and values are dropped with its caches.
            logits = mask_probe(rack, caches, start, probe_id, samples)[len(rack.stacks) - 1]  # (B, V)
        elif use_cache:
            logits, caches = rack.decode(new, start, caches)  # only the new positions run, against the caches
            logits = logits[:, -1]  # (B, V): the last position predicts the next token
            start += new.shape[1]
        elif probe_id is not None:
            probe = torch.full((samples, 1), probe_id, dtype=torch.long, device=device)
            logits = rack(torch.cat([seq, probe], dim=1), causal=True)[:, -1]  # (B, V): the [MASK]'s
        else:
            logits = rack(seq, causal=True)[:, -1]  # (B, V)
        logits = restrict_vocab(logits, vocab_size, banned)
        tok, _ = choose_tokens(logits, temperature, top_k, top_p, generator)  # (B,)
        steps += 1
        if on_step is not None:
            on_step()
        for b in (~done).nonzero().flatten().tolist():
            if eos_id is not None and tok[b].item() == eos_id:
                done[b] = True
            else:
                out[b].append(int(tok[b]))
        if bool(done.all()):
            break
        # Finished samples keep running in the batch (their tokens are dropped above): simpler than shrinking it.
        new = tok[:, None]
        if not use_cache:  # the reference path recomputes the whole sequence; the cached one runs only `new`
            seq = torch.cat([seq, new], dim=1)
    return Continuations(out, done.tolist(), steps)


# --- unmasking --------------------------------------------------------------------------------------------------


@dataclass
class Unmasked:
    """The result of unmasking: ``ids`` (B, L) with no ``[MASK]`` left, and ``step`` (B, L): the step (iterative) or
    the rack position of the stack (single pass) at which each position was committed; -1 for given tokens."""

    ids: torch.Tensor
    step: torch.Tensor
    steps: int  # forward passes run (iterative) or stacks run (single pass)


def _commit(confidence: torch.Tensor, masked: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: in each row the ``k[b]`` most confident still-masked positions (ties: leftmost first)."""
    conf = confidence.masked_fill(~masked, -math.inf)
    order = torch.sort(conf, dim=1, descending=True, stable=True).indices  # (B, L)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(conf.shape[1], device=conf.device).expand_as(order))
    return (rank < k[:, None]) & masked  # k <= masked count, so only masked positions are chosen


def _masked_logits(logits: torch.Tensor, mask_id: int, vocab_size: int | None) -> torch.Tensor:
    # The model must never "predict" [MASK]: a committed position would stay masked forever.
    return restrict_vocab(logits, vocab_size, (mask_id,))


@torch.inference_mode()
def unmask_iterative(
    rack: Rack,
    ids: torch.Tensor,
    mask_id: int,
    steps: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    time_input: bool = False,
    t_range: tuple[float, float] = (0.0, 1.0),
    vocab_size: int | None = None,
    on_step: OnStep | None = None,
) -> Unmasked:
    """Masked-diffusion sampling: ``ids`` (B, L) holds given tokens and ``mask_id`` where tokens are to be made.

    For s = 0 .. steps-1: run the rack bidirectionally on the current tokens, predict every position (argmax, or a
    sample when ``temperature`` > 0), and commit in each row the k_s = ceil(remaining / (steps - s)) most confident
    still-masked positions; the others stay masked. After ``steps`` steps nothing is masked, and given tokens are
    never changed. Steps with nothing left to unmask (steps > masked count) are skipped.

    ``time_input``: the model embeds the noise level, passed as ``t`` (B,) = the share of the whole sequence still
    masked (what t means in training), clamped to ``t_range``, the range the model was trained on.
    """
    assert steps >= 1
    check_sampling(temperature, top_k, top_p)
    x = ids.clone()
    masked = x == mask_id  # (B, L)
    step_of = torch.full_like(x, -1)
    passes = 0
    for s in range(steps):
        remaining = masked.sum(dim=1)  # (B,)
        if not bool(remaining.any()):
            break
        k = -(-remaining // (steps - s))  # ceil: spreads the remainder evenly over the steps left
        if time_input:
            t = (remaining.float() / x.shape[1]).clamp(*t_range)  # (B,)
            logits = rack(x, causal=False, t=t)
        else:
            logits = rack(x, causal=False)  # (B, L, V)
        tok, conf = choose_tokens(_masked_logits(logits, mask_id, vocab_size), temperature, top_k, top_p, generator)
        commit = _commit(conf, masked, k)
        x = torch.where(commit, tok, x)
        step_of[commit] = s
        masked &= ~commit
        passes += 1
        if on_step is not None:
            on_step()
    assert not bool(masked.any())
    return Unmasked(x, step_of, passes)


def check_ratios(ratios: Sequence[float], stacks: int) -> None:
    """Time-as-depth ratios: one per stack, each in [0, 1], not increasing from left to right."""
    if len(ratios) != stacks:
        raise ProjectError(f"the single pass needs one mask ratio per stack ({stacks}), got {len(ratios)}")
    if any(not 0 <= r <= 1 for r in ratios):
        raise ProjectError(f"mask ratios must be between 0 and 1, got {list(ratios)}")
    if any(a < b for a, b in zip(ratios, ratios[1:])):
        raise ProjectError(
            f"mask ratios must not increase from left to right (time runs backwards through depth), got {list(ratios)}"
        )


def masked_after(ratio: float, total: torch.Tensor) -> torch.Tensor:
    """How many of ``total`` (B,) positions stay masked at mask ratio ``ratio``: round(ratio * total), halves up."""
    return torch.floor(ratio * total.double() + 0.5).long()


@torch.inference_mode()
def unmask_single_pass(
    rack: Rack,
    ids: torch.Tensor,
    mask_id: int,
    ratios: Sequence[float],
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
    on_step: OnStep | None = None,
) -> Unmasked:
    """Time-as-depth sampling in one forward pass: ``ratios[i]`` is the mask ratio stack i was trained at.

    The tokens are embedded once: h = embed(ids). For each stack i in rack order, h = stack_i(h) (bidirectional),
    the head reads logits from h, and in each row the most confident still-masked positions are committed so that
    round(ratios[i+1] * n) of the n originally masked positions stay masked (0 after the last stack). A committed
    position keeps the token predicted at that stack. The hidden state is *not* re-embedded: committed tokens do not
    re-enter as embeddings; later stacks see them only through h, which already carries the evidence that made
    them confident. That is what makes it a single pass (len(rack) stacks of compute in all). It is a heuristic,
    not the process training followed: stack i was trained on the prefix's states of tokens masked at ratios[i],
    while here every stack sees the states of the fully masked input. ``--iterative`` re-embeds every commit.
    """
    check_ratios(ratios, len(rack.stacks))
    check_sampling(temperature, top_k, top_p)
    x = ids.clone()
    masked = x == mask_id
    total = masked.sum(dim=1)
    step_of = torch.full_like(x, -1)
    h = rack.ends.embed_tokens(x)  # (B, L, d), once
    for i, stack in enumerate(rack.stacks):
        h = stack(h, causal=False)
        keep_masked = masked_after(ratios[i + 1] if i + 1 < len(ratios) else 0.0, total)  # (B,)
        k = (masked.sum(dim=1) - keep_masked).clamp(min=0)
        if bool(k.any()):
            logits = _masked_logits(rack.ends.logits(h), mask_id, vocab_size)  # (B, L, V)
            tok, conf = choose_tokens(logits, temperature, top_k, top_p, generator)
            commit = _commit(conf, masked, k)
            x = torch.where(commit, tok, x)
            step_of[commit] = i
            masked &= ~commit
        if on_step is not None:
            on_step()
    assert not bool(masked.any())
    return Unmasked(x, step_of, len(rack.stacks))


# --- the project-level entry point ------------------------------------------------------------------------------


def resolve_mode(
    objective: str, time: str | None, causal: bool, single_pass: bool | None, curriculum: str = "left-to-right"
) -> str:
    """The generation mode for a recipe and the flags: ``--causal`` -> autoregressive on any model; clm ->
    autoregressive; mlm -> iterative; diffusion time-as-depth grown left to right -> single-pass (``--iterative``
    for the other); diffusion otherwise -> iterative. The single pass reads the head after every stack, which only
    left-to-right training fits it to; right to left and end to end the head was fitted to the last stack alone.
    Any other combination is an error naming what works."""
    flag = None if single_pass is None else ("--single-pass" if single_pass else "--iterative")
    if causal:
        if flag:
            raise StackwiseError(
                f"--causal generates left to right; {flag} is a way of unmasking", hint=f"drop --causal or {flag}"
            )
        return "autoregressive"
    kind = objective_kind(objective)
    if kind.causal:
        if flag:
            raise StackwiseError(
                f"{flag} unmasks tokens, but this project's objective is {objective} (it generates left to right)",
                hint=f"drop {flag}",
            )
        return "autoregressive"
    if kind.single_pass(time):
        if not curriculum_named(curriculum).head_reads_each_stack:
            if single_pass:
                raise StackwiseError(
                    f"--single-pass reads the head after every stack, but this rack was trained {curriculum}: the "
                    "head was fitted to the last stack's output only",
                    hint="drop --single-pass (iterative unmasking)",
                )
            return "iterative"
        return "iterative" if single_pass is False else "single-pass"
    if single_pass:
        raise StackwiseError(
            f"--single-pass needs a time-as-depth model (objective diffusion, diffusion.time depth); "
            f"this project's is {kind.describe(time)}",
            hint="drop --single-pass (iterative unmasking), or use --causal",
        )
    if kind.needs_mask_token:
        return "iterative"
    raise StackwiseError(f"no generation mode for objective {objective!r}", hint="use --causal")


@dataclass
class Sample:
    text: str  # the prompt followed by what was generated, decoded
    completion: str  # what was generated, decoded
    tokens: list[int]  # the generated ids (after the prompt)
    stop: str  # "eos" or "length" (autoregressive), "unmasked" (unmasking)


@dataclass
class GenerateResult:
    mode: str
    prompt: str
    prompt_tokens: list[int]
    steps: int
    samples: list[Sample]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_data(self) -> dict[str, Any]:
        """The first sample at the top level (``text``, ``tokens``...), and every sample under ``samples``."""
        first = self.samples[0]
        return {
            "mode": self.mode,
            "prompt": self.prompt,
            "prompt_tokens": self.prompt_tokens,
            "text": first.text,
            "completion": first.completion,
            "tokens": first.tokens,
            "stop": first.stop,
            "steps": self.steps,
            **self.settings,
            "samples": [vars(s) for s in self.samples],
        }


def _unused(mode: str, **given: Any) -> None:
    """Options that the chosen mode would ignore are an error, not a silent no-op."""
    applies = {
        "autoregressive": {"max_new_tokens", "ignore_eos"},
        "iterative": {"length", "steps"},
        "single-pass": {"length"},
    }[mode]
    for name, value in given.items():
        if value not in (None, False) and name not in applies:
            flag = "--" + name.replace("_", "-")
            why = " (it takes one step per stack)" if name == "steps" and mode == "single-pass" else ""
            raise StackwiseError(f"{flag} does not apply to {mode} generation{why}", hint=f"drop {flag}")


def generate(
    project: Project,
    prompt: str = "",
    *,
    causal: bool = False,
    single_pass: bool | None = None,
    max_new_tokens: int | None = None,
    length: int | None = None,
    steps: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    samples: int = 1,
    ignore_eos: bool = False,
    device: str = "auto",
    reporter: Reporter = QUIET,
) -> GenerateResult:
    """Generate ``samples`` texts from the project's rack. Reads the project, never writes to it.

    Every input is checked (and a StackwiseError raised) before any weights are loaded."""
    from stackwise_cli.data.tokenizer import id_bound, load_tokenizer
    from stackwise_cli.device import pick_device
    from stackwise_cli.model.io import load_current_rack

    m = project.load()
    if not m.rack:
        raise ProjectError("the rack is empty: nothing to generate with", hint="run `stackwise grow --side right`")
    require_trained(project, m, "generate would sample from")
    recipe = m.recipe
    time = recipe.diffusion.time
    mode = resolve_mode(recipe.objective, time, causal, single_pass, recipe.curriculum)
    if mode == "autoregressive" and recipe.model.time_embedding:
        raise StackwiseError(
            "a time-as-input diffusion model (model.time_embedding: true) needs the noise level t at every position, "
            "so it cannot generate left to right",
            hint="drop --causal (iterative unmasking)",
        )
    _unused(mode, max_new_tokens=max_new_tokens, ignore_eos=ignore_eos, length=length, steps=steps)
    check_sampling(temperature, top_k, top_p)
    if samples < 1:
        raise StackwiseError(f"--samples must be >= 1, got {samples}")
    for name, value in (("--max-new-tokens", max_new_tokens), ("--length", length), ("--steps", steps)):
        if value is not None and value < 1:
            raise StackwiseError(f"{name} must be >= 1, got {value}")

    max_len = recipe.model.max_seq_len
    tok = load_tokenizer(project.path(m.tokenizer.file), recipe.model.vocab_size)
    prompt_ids = tok.encode(prompt).ids if prompt else []
    if len(prompt_ids) > max_len:
        raise StackwiseError(
            f"the prompt is {len(prompt_ids)} tokens, longer than model.max_seq_len ({max_len})",
            hint=f"shorten --prompt to fewer than {max_len} tokens",
        )
    mask_id = m.tokenizer.mask_id
    settings: dict[str, Any] = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}

    if mode == "autoregressive":
        context = prompt_ids or [m.tokenizer.eos_id]  # an empty prompt starts a new document
        room = max_len - len(context)
        if room < 1:
            raise StackwiseError(
                f"the prompt is {len(context)} tokens: with model.max_seq_len {max_len} there is no room to generate",
                hint=f"shorten --prompt to fewer than {max_len} tokens",
            )
        if max_new_tokens is not None and max_new_tokens > room:
            raise StackwiseError(
                f"--max-new-tokens {max_new_tokens} plus the {len(context)}-token prompt exceeds model.max_seq_len "
                f"({max_len})",
                hint=f"use --max-new-tokens {room} or less",
            )
        max_new_tokens = max_new_tokens or room
        settings.update(causal=True, max_new_tokens=max_new_tokens, ignore_eos=ignore_eos)
        # mlm and diffusion predict the token under a [MASK]: the next token is read from one at the next position.
        settings.update(causal_readout="shifted" if objective_kind(recipe.objective).causal else "mask")
        if settings["causal_readout"] == "mask":
            require_mask_id(mask_id, "--causal on an mlm or diffusion rack reads each next token from one")
    else:
        require_mask_id(
            mask_id,
            "unmasking needs one",
            hint="generate left to right with --causal, or prepare the project with an mlm or diffusion recipe",
        )
        length = length or min(m.data.seq_len, max_len)
        if length > max_len:
            raise StackwiseError(
                f"--length {length} exceeds model.max_seq_len ({max_len})", hint=f"use --length {max_len} or less"
            )
        if length <= len(prompt_ids):
            raise StackwiseError(
                f"--length {length} leaves nothing to generate after the {len(prompt_ids)}-token prompt",
                hint=f"use --length {len(prompt_ids) + 1} or more (at most {max_len})",
            )
        settings.update(causal=False, length=length)
        if mode == "iterative":
            steps = steps or length - len(prompt_ids)  # default: one token per step
            settings.update(time_input=recipe.model.time_embedding)  # the recipe check ties it to diffusion.time
        else:
            ratios = [e.mask_ratio for e in m.rack]
            missing = [e.id for e, r in zip(m.rack, ratios) if r is None]
            if missing:
                raise ProjectError(
                    f"stacks {missing} have no mask_ratio in the manifest; the single pass needs one per stack",
                    hint="use --iterative",
                )
            check_ratios(ratios, len(m.rack))
            settings.update(ratios=ratios)

    dev = pick_device(device)
    m, rack = load_current_rack(project, manifest=m)
    rack = rack.to(dev).eval()
    generator = torch.Generator(device=dev).manual_seed(seed)
    vocab = id_bound(tok)  # ids past the tokenizer's were never trained
    total = {"autoregressive": max_new_tokens, "iterative": steps, "single-pass": len(rack.stacks)}[mode]
    with reporter.task(f"generate ({mode})", total=total) as advance:
        if mode == "autoregressive":
            cont = sample_autoregressive(
                rack,
                context,
                max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                eos_id=None if ignore_eos else m.tokenizer.eos_id,
                samples=samples,
                generator=generator,
                vocab_size=vocab,
                banned=() if mask_id is None else (mask_id,),
                probe_id=mask_id if settings["causal_readout"] == "mask" else None,
                on_step=advance,
            )
            rows = [prompt_ids + t for t in cont.tokens]
            stops = ["eos" if e else "length" for e in cont.stopped_at_eos]
            done_steps = cont.steps
        else:
            ids = torch.full((samples, length), mask_id, dtype=torch.long, device=dev)
            ids[:, : len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long, device=dev)
            common = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            common.update(vocab_size=vocab, on_step=advance)
            if mode == "iterative":
                t_range = (recipe.diffusion.t_min, recipe.diffusion.t_max)
                res = unmask_iterative(
                    rack, ids, mask_id, steps, time_input=settings["time_input"], t_range=t_range, **common
                )
            else:
                res = unmask_single_pass(rack, ids, mask_id, settings["ratios"], **common)
            rows = res.ids.tolist()  # [MASK] in the prompt was filled too (infilling)
            stops = ["unmasked"] * samples
            done_steps = res.steps

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=False)  # keep <|endoftext|>: it marks a document boundary

    made = [row[len(prompt_ids) :] for row in rows]
    out = [Sample(decode(row), decode(t), t, stop) for row, t, stop in zip(rows, made, stops)]
    return GenerateResult(mode, prompt, prompt_ids, done_steps, out, settings)
