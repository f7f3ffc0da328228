"""Offline KD: the teacher's top-k log-probs, computed once to disk and streamed in training.

Layout of ``<dir>``:
    manifest.json      {"key": ..., "k": k, "temperature": T, "vocab_size": Vt, "shard_blocks": S, "blocks": [block indices]}
    shard_00000.pt     {"index": (n,) long, "ids": (n, T, k) int32, "logprobs": (n, T, k) fp16}
Only the blocks the run will visit are computed: the training order is a function of
(seed, step), so that set is known up front. Shards are written atomically and skipped when
present, so an interrupted precompute resumes where it stopped; a manifest whose key differs
(other teacher, data, k or temperature) makes the folder be rebuilt. ``vocab_size`` is the
teacher's: kd_loss needs it (``teacher_vocab=cache.vocab_size``) to leave a student's padding
rows out of its softmax, as online KD does.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from compress.checkpoint import publish_file
from compress.losses import teacher_topk


def _shard_path(root: Path, j: int) -> Path:
    return root / f"shard_{j:05d}.pt"


def precompute(teacher, data, blocks: list[int], root: Path, *, k: int, temperature: float, key_parts: list,
               shard_blocks: int, batch_size: int, rank: int, world: int, barrier, device) -> "TopkCache":
    blocks = sorted(set(blocks))
    vocab_size = teacher.config.vocab_size
    key = hashlib.sha256(json.dumps([*key_parts, k, temperature, vocab_size, shard_blocks, blocks]).encode()).hexdigest()[:16]
    manifest = root / "manifest.json"
    if rank == 0:
        if manifest.exists() and json.loads(manifest.read_text()).get("key") != key:
            shutil.rmtree(root)  # computed for another teacher/data/k: start over
        root.mkdir(parents=True, exist_ok=True)
        if not manifest.exists():
            manifest.write_text(json.dumps({"key": key, "k": k, "temperature": temperature, "vocab_size": vocab_size,
                                            "shard_blocks": shard_blocks, "blocks": blocks}))
    barrier()
    shards = [blocks[i : i + shard_blocks] for i in range(0, len(blocks), shard_blocks)]
    mine = [j for j in range(len(shards)) if j % world == rank and not _shard_path(root, j).exists()]
    for j in tqdm(mine, desc="teacher top-k", disable=rank != 0 or not mine):
        index = torch.tensor(shards[j], dtype=torch.long)
        ids_out, lp_out = [], []
        for i in range(0, len(index), batch_size):
            x = data.batch(index[i : i + batch_size])["input_ids"].to(device)
            logits = teacher.logits(x).float()  # (B, T, Vt)
            assert logits.shape[-1] == vocab_size, f"teacher gives {logits.shape[-1]} logits, its config says {vocab_size}"
            ids, lp = teacher_topk(logits, k, temperature)
            ids_out.append(ids.int().cpu())
            lp_out.append(lp.half().cpu())
        shard = {"index": index, "ids": torch.cat(ids_out), "logprobs": torch.cat(lp_out)}
        publish_file(_shard_path(root, j), lambda tmp: torch.save(shard, tmp))
    barrier()
    return TopkCache(root)


class TopkCache:
    def __init__(self, root: Path):
        self.root = Path(root)
        meta = json.loads((self.root / "manifest.json").read_text())
        self.vocab_size = meta["vocab_size"]  # the teacher's: pass as kd_loss(teacher_vocab=...)
        # block index -> (shard, row): shards hold consecutive runs of the sorted block list
        self.where = {b: divmod(pos, meta["shard_blocks"]) for pos, b in enumerate(meta["blocks"])}
        self._loaded: dict[int, dict] = {}

    def _shard(self, j: int) -> dict:
        if j not in self._loaded:
            if len(self._loaded) >= 4:
                self._loaded.pop(next(iter(self._loaded)))
            self._loaded[j] = torch.load(_shard_path(self.root, j))
        return self._loaded[j]

    def get(self, indices: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        ids, lps = [], []
        for b in indices.tolist():
            j, row = self.where[b]
            shard = self._shard(j)
            assert shard["index"][row].item() == b, "offline KD cache out of order"
            ids.append(shard["ids"][row])
            lps.append(shard["logprobs"][row])
        return torch.stack(ids).long().to(device), torch.stack(lps).float().to(device)
