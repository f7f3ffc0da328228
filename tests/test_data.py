"""Data: deterministic split, packing, and an order that is a pure function of (seed, step)."""

import random

import pytest
import torch

from compress.data import _blocks, prepare_data, rank_micro_indices, sample_indices, split_documents
from compress.errors import CompressError
from compress.models import load_tokenizer
from compress.recipe import DataConfig


def test_blocks_overlap_by_one_token():
    ids = torch.arange(23, dtype=torch.int32)
    b = _blocks(ids, 5)
    assert b.shape == (4, 6)
    assert torch.equal(b[1], torch.arange(5, 11, dtype=torch.int32))
    assert torch.equal(b[:, -1][:-1], b[1:, 0])  # the label of one block is the next block's first input


def _docs(root, n):
    """n small files in two sub-folders, each holding one word no other file has."""
    paths = []
    for i in range(n):
        f = root / ("a" if i % 2 else "b") / f"doc{i}.txt"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f"word{i} " * 40)
        paths.append(f)
    return paths


def test_split_is_a_partition_by_name_that_ignores_order(tmp_path):
    paths = _docs(tmp_path, 1000)
    shuffled = [str(p) for p in paths]
    random.Random(0).shuffle(shuffled)
    root, train, val = split_documents(DataConfig(source="files", files=[str(tmp_path / "*/*.txt")], val_fraction=0.1))
    root2, train2, val2 = split_documents(DataConfig(source="files", files=shuffled, val_fraction=0.1))
    assert root == root2 == tmp_path
    assert set(val) == set(val2) and set(train) == set(train2), "listing order changed the split"
    assert not set(train) & set(val) and set(train) | set(val) == set(paths)
    assert 70 < len(val) < 130, len(val)  # ~10% of 1000
    _, _, val_wider = split_documents(DataConfig(source="files", files=shuffled, val_fraction=0.3))
    assert set(val) < set(val_wider) and 240 < len(val_wider) < 360, "a larger fraction only adds documents"


def test_prepare_data_trains_only_on_training_documents(tmp_path):
    _docs(tmp_path / "text", 60)
    cfg = DataConfig(source="files", files=[str(tmp_path / "text/*/*.txt")], val_fraction=0.2, block_size=16,
                     cache_dir=str(tmp_path / "cache"))
    _, train, val = split_documents(cfg)
    words = {side: {f.stem.replace("doc", "word") for f in files} for side, files in (("train", train), ("val", val))}
    tok = load_tokenizer("smollm2-135m-instruct")
    data = prepare_data(cfg, tok)
    for side, blocks in (("train", data.train), ("val", data.val)):
        # a block edge can cut a word ("word12" -> "word1"): only its inner words count
        seen = {w for b in blocks for w in tok.decode(b.tolist()).split()[1:-1] if w.startswith("word") and w[4:].isdigit()}
        assert seen and seen <= words[side], f"{side} blocks hold text of the other side: {sorted(seen - words[side])[:5]}"


def test_split_with_an_empty_side_raises(tmp_path):
    _docs(tmp_path, 2)
    with pytest.raises(CompressError, match="val_fraction"):
        split_documents(DataConfig(source="files", files=[str(tmp_path / "*/*.txt")], val_fraction=0.01))


def test_sample_indices_pure_and_epoch_permutations():
    n, gb = 10, 4
    a = torch.cat([sample_indices(7, s, n, gb) for s in range(5)])  # 20 samples = 2 epochs
    b = torch.cat([sample_indices(7, s, n, gb) for s in range(5)])
    assert torch.equal(a, b)
    assert sorted(a[:10].tolist()) == list(range(10)) and sorted(a[10:].tolist()) == list(range(10))
    assert not torch.equal(a[:10], a[10:]), "each epoch is reshuffled"
    assert not torch.equal(a, torch.cat([sample_indices(8, s, n, gb) for s in range(5)])), "seed matters"
    assert torch.equal(sample_indices(7, 3, n, gb), a[12:16]), "step 3 computed alone equals step 3 in sequence"


def test_rank_slices_partition_the_global_batch():
    batch = torch.arange(12)
    world, mb, accum = 2, 3, 2
    parts = [rank_micro_indices(batch, m, r, world, mb) for m in range(accum) for r in range(world)]
    assert torch.equal(torch.sort(torch.cat(parts)).values, batch)


def test_prepare_data_real_text_cached(tmp_path):
    tok = load_tokenizer("smollm2-135m-instruct")
    cfg = DataConfig(source="python-docs", block_size=64, max_docs=20, val_fraction=0.2, cache_dir=str(tmp_path))
    data = prepare_data(cfg, tok)
    assert data.train.shape[1] == 65 and len(data.train) > 10 and len(data.val) > 0
    files = list(tmp_path.glob("blocks-*.pt"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = prepare_data(cfg, tok)
    assert files[0].stat().st_mtime_ns == mtime, "second call reads the cache"
    assert torch.equal(again.train, data.train) and again.key == data.key
    text = tok.decode(data.train[0, :40].tolist())
    assert sum(c.isalpha() for c in text) > 20, text  # real English text, not noise
    batch = data.batch(torch.tensor([0, 1]))
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
