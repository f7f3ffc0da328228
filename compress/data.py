"""Text → packed token blocks, with a deterministic split and a (seed, step)-addressed order.

Sources:
  * ``python-docs``: the plain-text reST sources of the Python 3.11 documentation, from
    Debian's ``python3.11-doc`` package (PSF License), unpacked by ``scripts/setup.sh`` into
    ``.cache/python3.11-doc`` (or found installed under /usr/share/doc).
  * ``files``: any list of text files or globs.

Documents (files) go to train or validation by a hash of their name (``split_documents``, the
one place that decides it: training and the held-out lm-eval tasks both use it), so the split
does not depend on the order of files or on the tokenizer. Each side is tokenized, joined with the
EOS token and cut into blocks of ``block_size + 1`` tokens (inputs and shifted labels).
Tokenized blocks are cached under ``data.cache_dir`` keyed by the text and the tokenizer.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.checkpoint import publish_file
from compress.errors import CompressError

REPO = Path(__file__).resolve().parent.parent
PYDOCS_DIRS = (
    REPO / ".cache/python3.11-doc/usr/share/doc/python3.11/html/_sources",
    Path("/usr/share/doc/python3.11/html/_sources"),
)


def python_docs_dir() -> Path:
    for d in PYDOCS_DIRS:
        if d.is_dir():
            return d
    raise CompressError("Python docs text (Debian python3.11-doc) not found; run `bash scripts/setup.sh` or use data.source=files")


def source_files(cfg) -> list[Path]:
    if cfg.source == "python-docs":
        files = sorted(python_docs_dir().rglob("*.txt"))
    else:
        files = []
        for pattern in cfg.files:
            hits = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True))
            if not hits:
                raise CompressError(f"data.files: {pattern!r} matches no file; fix the path or glob")
            files += [h for h in hits if h.is_file()]
    if cfg.max_docs:
        files = files[: cfg.max_docs]
    if len(files) < 2:
        raise CompressError("data has fewer than 2 documents; a train/validation split needs more files")
    return files


def is_validation(name: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big")
    return (h % 10_000) < fraction * 10_000


def split_documents(cfg) -> tuple[Path, list[Path], list[Path]]:
    """(root, train_files, val_files) for a ``DataConfig``: the one train/validation split.

    A document is validation when the hash of its path relative to ``root`` says so
    (``is_validation`` with ``cfg.val_fraction``), after ``cfg.max_docs`` is applied.

        root, train, val = split_documents(recipe.data)
    """
    files = source_files(cfg)
    # python-docs names are relative to the docs folder, whatever slice max_docs keeps
    root = python_docs_dir() if cfg.source == "python-docs" else Path(os.path.commonpath([str(f.parent) for f in files]))
    is_val = [is_validation(str(f.relative_to(root)), cfg.val_fraction) for f in files]
    train = [f for f, v in zip(files, is_val) if not v]
    val = [f for f, v in zip(files, is_val) if v]
    if not val or not train:
        raise CompressError(f"data split left an empty side ({len(train)} train / {len(val)} validation documents); add files or change data.val_fraction")
    return root, train, val


def _cache_key(files: list[Path], root: Path, tokenizer, cfg) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    h.update(repr(sorted(tokenizer.get_vocab().items())[:: 97]).encode())
    h.update(f"{len(tokenizer)}|{tokenizer.eos_token_id}|{cfg.block_size}|{cfg.val_fraction}".encode())
    return h.hexdigest()[:16]


def _tokenize(files: list[Path], tokenizer) -> torch.Tensor:
    ids: list[int] = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.int32)


def _blocks(ids: torch.Tensor, block_size: int) -> torch.Tensor:
    n = (len(ids) - 1) // block_size
    if n == 0:
        return ids.new_empty((0, block_size + 1))
    # overlapping by one token so that every position has a label
    return ids.unfold(0, block_size + 1, block_size)[:n].clone()


@dataclass
class TokenData:
    train: torch.Tensor  # (N, block_size + 1) int32
    val: torch.Tensor  # (M, block_size + 1) int32
    key: str

    def batch(self, indices: torch.Tensor, split: str = "train") -> dict:
        blocks = (self.train if split == "train" else self.val)[indices].long()
        return {"input_ids": blocks[:, :-1], "labels": blocks[:, 1:], "index": indices}


def prepare_data(cfg, tokenizer, is_main: bool = True, barrier=lambda: None) -> TokenData:
    """Tokenize and pack once (main rank writes the cache, others wait), then load."""
    root, train_files, val_files = split_documents(cfg)
    key = _cache_key(sorted(train_files + val_files), root, tokenizer, cfg)
    path = Path(cfg.cache_dir) / f"blocks-{key}.pt"
    if is_main and not path.exists():
        blocks = {"train": _blocks(_tokenize(train_files, tokenizer), cfg.block_size),
                  "val": _blocks(_tokenize(val_files, tokenizer), cfg.block_size)}
        publish_file(path, lambda tmp: torch.save(blocks, tmp))  # a half-written cache is never read
    barrier()
    blocks = torch.load(path)
    if len(blocks["train"]) == 0 or len(blocks["val"]) == 0:
        raise CompressError(f"data gives {len(blocks['train'])} train / {len(blocks['val'])} validation blocks of {cfg.block_size} tokens; use more text or a smaller data.block_size")
    return TokenData(blocks["train"], blocks["val"], key)


def sample_indices(seed: int, step: int, n: int, global_batch: int) -> torch.Tensor:
    """The global batch of step ``step``: a pure function of (seed, step).

    Sample g = step * global_batch + j reads position g % n of the permutation of epoch
    g // n, drawn from a generator seeded with (seed, epoch). A resumed run, or one with a
    different number of ranks, sees exactly the same examples at the same step.
    """
    out = torch.empty(global_batch, dtype=torch.long)
    start = step * global_batch
    perms: dict[int, torch.Tensor] = {}
    for j in range(global_batch):
        epoch, pos = divmod(start + j, n)
        if epoch not in perms:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(n, generator=g)
        out[j] = perms[epoch][pos]
    return out


def rank_micro_indices(batch: torch.Tensor, micro: int, rank: int, world: int, micro_batch: int) -> torch.Tensor:
    """This rank's slice of the global batch for gradient-accumulation micro step ``micro``."""
    start = (micro * world + rank) * micro_batch
    return batch[start : start + micro_batch]
