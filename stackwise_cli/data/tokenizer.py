"""The tokenizer: byte-level BPE trained on the project's own text, or a tokenizers-library JSON file."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from stackwise_cli.errors import DataError
from stackwise_cli.objectives import objective_kind

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


def tokenizer_file(path: Path) -> Path:
    """The tokenizers-library JSON file that ``--tokenizer`` names: the file itself, or ``tokenizer.json`` inside a
    folder (a Hugging Face model folder)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise DataError(
                f"{path} is a folder without a tokenizer.json",
                hint="give a tokenizers JSON file, or a Hugging Face folder that has one (a fast tokenizer)",
            )
        return path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"tokenizer file {path} does not exist")
    return path


def _special_content(value: object) -> str | None:
    # tokenizer_config.json spells a special token as a string or as an AddedToken dict {"content": ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def eos_token_of(path: Path, tok: Tokenizer) -> str:
    """The token that separates documents, from the tokenizer's own config: ``eos_token`` in the
    ``tokenizer_config.json`` (or ``special_tokens_map.json``) beside the tokenizer file; a tokenizer whose config
    has none but a ``sep_token`` (BERT's ``[SEP]``) separates with that. Without a config, ``EOS``."""
    import json

    path = tokenizer_file(path)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config_path = path.parent / name
        if not config_path.is_file():
            continue
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{config_path} is not readable JSON ({e})") from None
        for key in ("eos_token", "sep_token"):
            token = _special_content(config.get(key))
            if token is None:
                continue
            if tok.token_to_id(token) is None:
                raise DataError(f"{config_path}: {key} {token!r} is not in {path}'s vocabulary")
            return token
    if tok.token_to_id(EOS) is None:
        raise DataError(
            f"{path} has no {EOS} token and no tokenizer_config.json beside it naming its eos_token; "
            "stackwise separates documents with it",
            hint=f"add {EOS} as a special token, or a tokenizer_config.json with an eos_token",
        )
    return EOS


def needs_mask(objective: str | None) -> bool:
    """Whether the objective feeds ``[MASK]`` to the model (mlm, diffusion); None: unknown, assume it does."""
    return objective is None or objective_kind(objective).needs_mask_token


def read_tokenizer(path: Path) -> tuple[Tokenizer, str]:
    """The tokenizer that ``--tokenizer`` names (a file or a folder) as it is, and its end-of-text token."""
    path = tokenizer_file(path)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for any parse problem
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path} is not a tokenizers JSON file ({first})") from e
    return tok, eos_token_of(path, tok)


def add_specials(tok: Tokenizer, objective: str | None, spare_rows: bool = True) -> Tokenizer:
    """``tok`` with ``[MASK]`` added if the objective needs it, and ``[PAD]`` if ``spare_rows`` (the model has
    embedding rows to give it); each a new special token after the existing ids."""
    if needs_mask(objective) and tok.token_to_id(MASK) is None:
        tok.add_special_tokens([MASK])
    if spare_rows and tok.token_to_id(PAD) is None:
        tok.add_special_tokens([PAD])
    return tok


def load_tokenizer(path: Path, vocab_size: int, objective: str | None = None) -> Tokenizer:
    """Load a tokenizers-library JSON file (or the ``tokenizer.json`` of a Hugging Face folder) and check that it
    fits a model with ``vocab_size`` embeddings.

    A tokenizer without ``MASK`` gets it added where the objective needs it (None: any objective), and one without
    ``PAD`` gets it where the model has a spare embedding row for it (an export then pads with end-of-text, as
    GPT-2 does), each as a special token with a new id after the existing ones. Its end-of-text token is
    ``eos_token_of``'s."""
    tok, _ = read_tokenizer(path)
    add_specials(tok, objective, spare_rows=False)
    add_specials(tok, objective, spare_rows=id_bound(tok) < vocab_size)
    needed = id_bound(tok)
    if needed > vocab_size:
        raise DataError(
            f"{tokenizer_file(path)} has {needed} tokens but model.vocab_size is {vocab_size}",
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


def eos_id(tok: Tokenizer, token: str = EOS) -> int:
    """The id of the end-of-text token that separates documents (``token``: the tokenizer's own, see
    ``eos_token_of``)."""
    i = tok.token_to_id(token)
    if i is None:
        raise DataError(f"the tokenizer has no {token} token")
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
