"""Score an mlm project's export with Hugging Face transformers, at stackwise's own masks, beside a unigram model.

    python examples/masked/score_hf.py PROJECT [--ratio 0.15] [--max-sequences N]

Loads PROJECT/fused/ as ``AutoModelForMaskedLM`` (BertForMaskedLM for the bert family), masks the val split as
``stackwise eval`` does (epoch 0 of each sequence: the same positions, the same 80/10/10 corruption) at ``--ratio``,
and prints one JSON line: the masked loss in nats per masked token, and the loss of the train split's unigram
distribution (add-one smoothed, as ``evaluate.eval.unigram_entropy``) on the same sequences, so the two numbers
score the same tokens. Without ``--max-sequences`` the whole val split is scored. docs/bench.md uses it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import torch
import transformers

from stackwise_cli.evaluate.eval import val_sequences
from stackwise_cli.objectives import objective_for
from stackwise_cli.store.manifest import tokenizer_special_ids
from stackwise_cli.store.project import Project
from stackwise_cli.store.shards import read_token_shard


def unigram_loss(project: Project, m, tokens: np.ndarray) -> float:
    """Mean -log p(token) of ``tokens`` (N, T) under the train split's add-one smoothed unigram distribution."""
    counts = np.zeros(m.recipe.model.vocab_size)
    for s in m.data.splits["train"].shards:
        shard = read_token_shard(project.path(s.file))
        counts += np.bincount(np.asarray(shard.tokens).ravel(), minlength=len(counts))
    probs = (counts + 1) / (counts.sum() + len(counts))
    return float(-np.log(probs[tokens.ravel()]).mean())


@torch.inference_mode()
def masked_loss(project: Project, m, tokens: np.ndarray, seq_ids: np.ndarray, ratio: float) -> tuple[float, int]:
    """transformers' masked loss on fused/ at ``ratio``, with the masks stackwise eval draws: (nats, positions)."""
    model = transformers.AutoModelForMaskedLM.from_pretrained(project.path("fused"), dtype=torch.float32).eval()
    recipe = dataclasses.replace(m.recipe, objective="mlm")
    obj = objective_for(recipe, m.tokenizer.mask_id, m.tokenizer.vocab_size, ratio, tokenizer_special_ids(m))
    total, count = 0.0, 0
    for lo in range(0, len(tokens), 32):
        c = obj.corrupt(torch.from_numpy(tokens[lo : lo + 32].astype(np.int64)), seq_ids[lo : lo + 32], 0)
        logits = model(c.inputs, attention_mask=torch.ones_like(c.inputs)).logits  # (B, T, vocab)
        total += float(obj.loss(logits, c, reduction="sum"))
        count += obj.counted(c)
    return total / count, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project")
    parser.add_argument("--ratio", type=float, default=0.15)
    parser.add_argument("--max-sequences", type=int, default=None)
    args = parser.parse_args()
    project = Project(args.project)
    m = project.load()
    tokens, seq_ids = val_sequences(project, m, "val", args.max_sequences)
    loss, count = masked_loss(project, m, tokens, seq_ids, args.ratio)
    out = {"masked_loss": round(loss, 4), "unigram": round(unigram_loss(project, m, tokens), 4)}
    print(json.dumps(out | {"ratio": args.ratio, "sequences": len(tokens), "masked_positions": count}))


if __name__ == "__main__":
    main()
