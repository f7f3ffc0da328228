"""Data: deterministic split, packing, and an order that is a pure function of (seed, step)."""

import torch

from compress.data import _blocks, is_validation, prepare_data, rank_micro_indices, sample_indices
from compress.models import load_tokenizer
from compress.recipe import DataConfig


def test_blocks_overlap_by_one_token():
    ids = torch.arange(23, dtype=torch.int32)
    b = _blocks(ids, 5)
    assert b.shape == (4, 6)
    assert torch.equal(b[1], torch.arange(5, 11, dtype=torch.int32))
    assert torch.equal(b[:, -1][:-1], b[1:, 0])  # the label of one block is the next block's first input


def test_split_is_by_name_not_order():
    names = [f"doc{i}.txt" for i in range(2000)]
    val = {n for n in names if is_validation(n, 0.1)}
    assert 150 < len(val) < 250
    assert val == {n for n in reversed(names) if is_validation(n, 0.1)}


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
