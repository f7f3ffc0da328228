"""Offline KD cache: exact teacher top-k per block, uneven shards, resumable precompute."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from compress.data import TokenData
from compress.losses import KD_LOSSES, kd_loss, teacher_topk
from compress.offline_kd import TopkCache, precompute
from compress.teacher import Teacher


def _setup():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, initializer_range=0.5))
    data = TokenData(train=torch.randint(0, 50, (20, 9), dtype=torch.int32), val=torch.zeros(1, 9, dtype=torch.int32),
                     key="k")
    return Teacher(model), data


def _run(teacher, data, root, blocks):
    return precompute(teacher, data, blocks, root, k=5, temperature=2.0, key_parts=["t", data.key], shard_blocks=4,
                      batch_size=3, rank=0, world=1, barrier=lambda: None, device="cpu")


def test_cache_returns_the_teachers_topk_with_uneven_shards(tmp_path):
    teacher, data = _setup()
    blocks = [17, 3, 3, 9, 0, 12, 5, 8, 19, 11]  # 9 distinct blocks: shards of 4, 4, 1
    cache = _run(teacher, data, tmp_path, blocks)
    assert len(list(tmp_path.glob("shard_*.pt"))) == 3
    query = torch.tensor([19, 3, 12])
    ids, logprobs = cache.get(query, "cpu")
    want_ids, want_lp = teacher_topk(teacher.logits(data.batch(query)["input_ids"]), 5, 2.0)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(logprobs, want_lp, rtol=0, atol=2e-3)  # stored as fp16


def test_precompute_resumes_and_rebuilds_on_a_new_key(tmp_path):
    teacher, data = _setup()
    blocks = list(range(10))
    _run(teacher, data, tmp_path, blocks)
    shards = sorted(tmp_path.glob("shard_*.pt"))
    before = {s.name: s.stat().st_mtime_ns for s in shards}
    shards[1].unlink()  # as if killed before this shard was written
    _run(teacher, data, tmp_path, blocks)
    after = {s.name: s.stat().st_mtime_ns for s in sorted(tmp_path.glob("shard_*.pt"))}
    assert after[shards[0].name] == before[shards[0].name] and after[shards[2].name] == before[shards[2].name]
    assert shards[1].exists()
    _run(teacher, data, tmp_path, blocks[:6])  # other blocks: the folder is rebuilt
    assert len(list(tmp_path.glob("shard_*.pt"))) == 2
    assert TopkCache(tmp_path).where[5] == (1, 1)


def test_cache_records_the_teacher_vocab_for_a_padded_student(tmp_path):
    """Offline KD through the cache leaves a student's padding rows out, as online KD does."""
    teacher, data = _setup()
    cache = _run(teacher, data, tmp_path, list(range(6)))
    assert cache.vocab_size == TopkCache(tmp_path).vocab_size == 50
    query = torch.tensor([4, 1])
    t_logits = teacher.logits(data.batch(query)["input_ids"])
    student = torch.randn_like(t_logits) * 3
    for pad in (torch.randn(*student.shape[:-1], 14) * 10, torch.full((*student.shape[:-1], 14), 20.0)):
        padded = torch.cat([student, pad], -1)  # Vs = 64 > Vt = 50
        for kind in KD_LOSSES:
            offline = kd_loss(padded, teacher_topk=cache.get(query, "cpu"), teacher_vocab=cache.vocab_size, kind=kind, temperature=2.0)
            online = kd_loss(padded, t_logits, top_k=5, kind=kind, temperature=2.0)
            torch.testing.assert_close(offline, online, rtol=0, atol=2e-3)  # the cache stores fp16
