"""The fused model read back: ``fused/model.safetensors`` (Hugging Face names) as a ``Rack``, for ``eval --fused``.

After ``fuse --finetune-steps`` the model a user loads is fused/, not the rack's files; scoring it needs its
weights in our modules. The export (``model/hf.py``: ``hf_state_dict``) only moves entries: it renames, transposes
(GPT-2's Conv1D) and concatenates (GPT-2's c_attn) our tensors, and writes some twice (BERT's decoder bias). So its
inverse needs no second table: export a rack of the same shape whose every entry holds its own index, and each
exported entry then says which of our entries it came from.
"""

from __future__ import annotations

import torch

from stackwise_cli.errors import CorruptFileError, ProjectError
from stackwise_cli.model.hf import hf_state_dict
from stackwise_cli.model.model import Ends, Rack, Stack
from stackwise_cli.store.manifest import Manifest
from stackwise_cli.store.project import Project
from stackwise_cli.store.weights import load_tensors


def skeleton(m: Manifest) -> Rack:
    """A rack of the manifest's shape (recipe model and attention, each stack's blocks), weights uninitialised."""
    cfg, attn = m.recipe.model, m.recipe.attention
    return Rack(cfg, Ends(cfg), [Stack(cfg, s.blocks, attn) for s in m.rack], [s.id for s in m.rack])


def load_hf_tensors_into(rack: Rack, tensors: dict[str, torch.Tensor], bidirectional: bool, where: str) -> Rack:
    """Fill ``rack`` from ``tensors`` under the Hugging Face names ``hf_state_dict(rack)`` would write: its inverse.
    A tensor missing or of the wrong shape, or an entry of ours nothing fills, is a CorruptFileError naming
    ``where``."""
    stacks = [Stack(rack.cfg, len(s.blocks), s.attn) for s in rack.stacks]
    index = Rack(rack.cfg, Ends(rack.cfg), stacks, list(rack.ids)).to(torch.float64)  # float64: exact up to 2^53
    first: dict[str, int] = {}  # our entry -> the index of its first element
    seen: dict[int, int] = {}  # tied tensors (one tensor under two names) get one range
    n = 0
    with torch.no_grad():
        for key, q in index.state_dict(keep_vars=True).items():
            if id(q) not in seen:
                seen[id(q)] = n
                q.copy_(torch.arange(n, n + q.numel(), dtype=torch.float64).view_as(q))
                n += q.numel()
            first[key] = seen[id(q)]
    flat = torch.empty(n, dtype=torch.float32)
    filled = torch.zeros(n, dtype=torch.bool)
    for name, idx in hf_state_dict(index, bidirectional).items():
        t = tensors.get(name)
        if t is None or t.shape != idx.shape:
            found = "missing" if t is None else f"of shape {list(t.shape)}"
            raise CorruptFileError(
                f"{where}: tensor {name} is {found}; this project's model needs {list(idx.shape)}",
                hint="run `stackwise fuse` to write fused/ again",
            )
        at = idx.reshape(-1).long()
        flat[at] = t.reshape(-1).float()
        filled[at] = True
    if not bool(filled.all()):
        raise CorruptFileError(f"{where} does not hold every weight of the model", hint="run `stackwise fuse`")
    with torch.no_grad():
        for key, p in rack.state_dict(keep_vars=True).items():
            p.copy_(flat[first[key] : first[key] + p.numel()].view_as(p))
    return rack


def require_current_fused(project: Project, m: Manifest) -> None:
    """fused/ must exist and be built from the current ends and rack; else one error saying to fuse."""
    if m.fused is None or not project.path(f"{m.fused.dir}/model.safetensors").exists():
        raise ProjectError("there is no fused model to score (fused/ is missing)", hint="run `stackwise fuse`")
    if not m.fused_is_current():
        raise ProjectError(
            f"{m.fused.dir}/ was fused from an earlier rack or ends than the current ones",
            hint="run `stackwise fuse` to fuse the current rack",
        )


def load_fused(project: Project, m: Manifest) -> Rack:
    """The model in fused/ as a rack, checked against the manifest's ``fused`` entry: it must exist and be built
    from the current ends and rack (whose shapes it is read into)."""
    require_current_fused(project, m)
    path = project.path(f"{m.fused.dir}/model.safetensors")
    tensors = load_tensors(path, m.fused.sha256)
    return load_hf_tensors_into(skeleton(m), tensors, m.recipe.bidirectional, str(path))
