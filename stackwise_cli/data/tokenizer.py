"""The tokenizer: byte-level BPE trained on the project's own text, or a tokenizers-library JSON file."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from stackwise_cli.errors import DataError

EOS = "<|endoftext|>"
MASK = "[MASK]"  # the masked-objective token (mlm, diffusion); never produced by encoding text
# Padding for batches of unequal length in a Hugging Face fine-tune of an export; never in the packed data, so
# its embedding row is one no training step touches (HF freezes the pad row: it must not be a real token's).
PAD = "[PAD]"
SPECIAL_TOKENS = (EOS, MASK, PAD)  # ids 0, 1, 2 of a trained tokenizer
# 256 byte tokens + the special tokens: the smallest vocabulary a byte-level BPE can have, with no merges at all.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style) with ``EOS`` (id 0), ``MASK`` (id 1) and ``PAD`` (id 2) as its special
    tokens.

    The full byte alphabet is seeded, so any input, in any script, encodes without an unknown token. Training is
    deterministic: the same texts give the same tokenizer file.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"model.vocab_size={vocab_size} is too small for a byte-level tokenizer (needs >= {MIN_VOCAB_SIZE})",
            hint=f"--set model.vocab_size={MIN_VOCAB_SIZE} or more",
        )
    tok = Tokenizer(models.BPE())
    # No prefix space: documents are concatenated as they are, and " x" vs "x" must stay distinct tokens.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: Path, vocab_size: int) -> Tokenizer:
    """Load a tokenizers-library JSON file and check that it fits a model with ``vocab_size`` embeddings.

    A tokenizer without ``MASK`` or ``PAD`` gets it added as a special token (a new id after the existing ones),
    so every project can train a masked objective and export a tokenizer that pads."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file {path} does not exist")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for any parse problem
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path} is not a tokenizers JSON file ({first})") from e
    if tok.token_to_id(EOS) is None:
        raise DataError(
            f"{path} has no {EOS} token; stackwise separates documents with it", hint=f"add {EOS} as a special token"
        )
    for special in (MASK, PAD):
        if tok.token_to_id(special) is None:
            tok.add_special_tokens([special])
    needed = id_bound(tok)
    if needed > vocab_size:
        raise DataError(
            f"{path} has {needed} tokens but model.vocab_size is {vocab_size}",
            hint=f"--set model.vocab_size={needed}",
        )
    return tok


def text_encoder(tok: Tokenizer) -> Tokenizer:
    """A copy of ``tok`` that encodes input text as text: the literal strings ``<|endoftext|>`` or ``[MASK]`` in a
    document become ordinary byte/merge ids, never the special ids, which only stackwise itself inserts.

    ``add_special_tokens=False`` is not enough: it stops a post-processor adding tokens, yet special tokens that
    appear in the text are still matched. The switch is not saved in ``tokenizer.json``, and the copy leaves
    ``tok`` as it was (a Hugging Face export, say, still turns a typed ``[MASK]`` into the mask token)."""
    enc = Tokenizer.from_str(tok.to_str())
    enc.encode_special_tokens = True
    return enc


def id_bound(tok: Tokenizer) -> int:
    """One past the largest id the tokenizer defines: the embedding rows it needs. Ids, not the count, are what
    index the embedding, and a hand-edited vocabulary can have gaps."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def eos_id(tok: Tokenizer) -> int:
    """The id of the end-of-text token that separates documents."""
    i = tok.token_to_id(EOS)
    if i is None:
        raise DataError(f"the tokenizer has no {EOS} token")
    return i


def mask_id(tok: Tokenizer) -> int:
    """The id of the ``[MASK]`` token of the masked objectives."""
    i = tok.token_to_id(MASK)
    if i is None:
        raise DataError(f"the tokenizer has no {MASK} token")
    return i


def pad_id(tok: Tokenizer) -> int | None:
    """The id of ``[PAD]``, or None for a tokenizer that has none (one from a project prepared before it)."""
    return tok.token_to_id(PAD)


def special_ids(tok: Tokenizer) -> list[int]:
    """Every special token's id (EOS, MASK, PAD, and any other a loaded tokenizer declares special)."""
    return sorted(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
