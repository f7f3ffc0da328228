"""On-policy distillation (GKD), sampling, the chunked loss inside the stage, and several teachers."""

import copy
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from compress.errors import CompressError
from compress.methods.distill import Distill, draw
from compress.recipe import load_recipe
from compress.sampling import interleaved_continuations, sample_continuations, top_p_filter
from compress.stages import RunContext
from compress.teacher import Teacher
from tests.tiny import write_recipe

V, T = 80, 12


def _llama(seed, layers=2, vocab=V):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=1, initializer_range=0.5,
                                        tie_word_embeddings=True, max_position_embeddings=64))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    kept = top_p_filter(logits, 0.8).isfinite()
    assert kept.tolist() == [[True, False, True, False]]  # 0.5 + 0.3 reaches 0.8
    assert top_p_filter(logits, 0.5).isfinite().tolist() == [[True, False, False, False]]
    assert top_p_filter(logits, 1.0).isfinite().all()


def test_greedy_sampling_equals_transformers_generate():
    model = _llama(0).eval()
    prompts = torch.randint(0, V, (3, 5))
    ours = sample_continuations(model, prompts, 7, temperature=0.0)
    ref = model.generate(prompts, max_new_tokens=7, min_new_tokens=7, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, ref)


def test_sampling_never_draws_padding_ids_and_is_seeded():
    model = _llama(0, vocab=V + 16)
    with torch.no_grad():
        model.lm_head.weight[V:] = 50.0  # padding rows that would win every draw
    prompts = torch.randint(0, V, (4, 3))
    a = sample_continuations(model, prompts, 20, generator=torch.Generator().manual_seed(1), vocab_size=V)
    b = sample_continuations(model, prompts, 20, generator=torch.Generator().manual_seed(1), vocab_size=V)
    assert a.max() < V and torch.equal(a, b) and torch.equal(a[:, :3], prompts)
    assert model.training  # put back as it was


def test_sampling_on_a_static_cache_gives_the_dynamic_caches_tokens():
    """graphs=True: the static-cache decoder (CUDA graphs on CUDA; here its eager path, the same
    positions and mask) samples what the DynamicCache loop samples, and is reused across calls."""
    from compress.sampling import _samplers

    model = _llama(0).eval()
    prompts = torch.randint(0, V, (3, 5))
    for temperature, top_p in ((0.0, 1.0), (1.0, 1.0), (0.8, 0.9)):
        draws = [sample_continuations(model, prompts, 9, temperature=temperature, top_p=top_p, graphs=graphs,
                                      generator=torch.Generator().manual_seed(4)) for graphs in (False, True)]
        assert torch.equal(draws[1], draws[0]), (temperature, top_p)
    first = _samplers[model][3]
    sample_continuations(model, prompts[:, :2], 20, temperature=0.0, graphs=True)  # shorter prompt, same length cap
    assert _samplers[model][3] is first and first.max_len == 64
    sample_continuations(model, prompts[:2], 3, temperature=0.0, graphs=True)  # another batch size: its own cache
    assert set(_samplers[model]) == {2, 3}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the sampler's CUDA graphs")
def test_cuda_graph_sampling_follows_the_weights_and_equals_eager():
    from compress.sampling import _samplers

    model = _llama(0).cuda()
    prompts = torch.randint(0, V, (4, 5), device="cuda")
    eager = sample_continuations(model, prompts, 12, temperature=0.0, graphs=False)
    assert torch.equal(sample_continuations(model, prompts, 12, temperature=0.0), eager)  # auto: graphs on CUDA
    dec = _samplers[model][4]
    assert dec.graph_error is None and 1 in dec.graphs  # decode steps replayed a graph
    with torch.no_grad():
        for p in model.parameters():  # an optimizer step in place, then a wrapper that moves the weights
            p.add_(0.05 * torch.randn_like(p))
        model.lm_head.weight.data = model.lm_head.weight.data.clone() * 1.5
    moved = sample_continuations(model, prompts, 12, temperature=0.0, graphs=False)
    assert not torch.equal(moved, eager)
    assert torch.equal(sample_continuations(model, prompts, 12, temperature=0.0), moved)


def test_draw_depends_only_on_seed_step_micro_and_matches_lambda():
    assert draw(3, 10, 1) == draw(3, 10, 1) != draw(3, 10, 0)
    u = torch.tensor([draw(0, s, m) for s in range(2000) for m in range(2)])
    assert 0 <= u.min() and u.max() < 1 and abs((u < 0.3).float().mean().item() - 0.3) < 0.03


def _method(tmp_path, stage: dict, teacher_model=None, extra=()):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path, tmp_path / "out", stages=[{"kind": "distill", **stage}],
                                      data={"block_size": T}))
    ctx = RunContext(recipe=recipe, output_dir=tmp_path, tokenizer=None, data=None, logger=None,
                     device=torch.device("cpu"), teacher=Teacher(teacher_model or _llama(1, layers=3)),
                     extra_teachers=[(w, Teacher(m)) for w, m in extra], extra={"stage_seed": 7})
    method = Distill(recipe.stages[0], ctx)
    module = method.wrap(_llama(0))
    return method, module


def _batch(x, step=0, micro=0):
    return {"input_ids": x, "labels": torch.roll(x, -1, 1), "index": torch.arange(len(x)), "step": step, "micro": micro}


def _loss_and_grads(method, module, batch):
    loss, logs = method.loss(module, batch)
    return loss, torch.autograd.grad(loss, [p for p in module.parameters() if p.requires_grad]), logs


def test_lambda_zero_equals_off_policy(tmp_path):
    x = torch.randint(0, V, (2, T))
    plain, m_plain = _method(tmp_path, {"loss": "jsd"})
    zero, m_zero = _method(tmp_path, {"loss": "jsd", "on_policy": {"lmbda": 0.0}})
    for step in range(3):
        a, ga, _ = _loss_and_grads(plain, m_plain, _batch(x, step))
        b, gb, logs = _loss_and_grads(zero, m_zero, _batch(x, step))
        assert logs["on_policy"] == 0 and torch.equal(a, b)
        assert all(torch.equal(u, w) for u, w in zip(ga, gb))


def test_lambda_one_never_reads_the_continuations(tmp_path):
    method, module = _method(tmp_path, {"on_policy": {"lmbda": 1.0, "prompt_tokens": 4}})
    x = torch.randint(0, V, (2, T))
    y = x.clone()
    y[:, 4:] = torch.randint(0, V, (2, T - 4))  # same prompts, other continuations
    a, _, logs = _loss_and_grads(method, module, _batch(x, step=5))
    b, _, _ = _loss_and_grads(method, module, _batch(y, step=5))
    assert logs["on_policy"] == 1 and torch.equal(a, b)
    plain, m_plain = _method(tmp_path, {})
    assert not torch.allclose(plain.loss(m_plain, _batch(x, step=5))[0], a)  # the sampled path really ran


def test_on_policy_scores_the_students_samples_on_the_sampled_positions(tmp_path):
    """λ = 1 == plain KD on (prompt + the student's own samples), masked to the sampled positions."""
    from compress.losses import kd_loss

    teacher = _llama(1, layers=3)
    method, module = _method(tmp_path, {"on_policy": {"lmbda": 1.0, "prompt_tokens": 5, "temperature": 0.0}},
                             teacher_model=teacher)
    x = torch.randint(0, V, (2, T))
    loss, _ = method.loss(module, _batch(x))
    seq = sample_continuations(module.student, x[:, :5], T - 5, temperature=0.0)
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[:, 4:] = True
    want = kd_loss(module.student(input_ids=seq).logits, teacher(input_ids=seq).logits, mask=mask)
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-6)


def test_seq_kd_samples_from_the_teacher(tmp_path):
    teacher = _llama(1, layers=3)
    method, module = _method(tmp_path, {"on_policy": {"lmbda": 1.0, "source": "teacher", "prompt_tokens": 3,
                                                      "temperature": 0.0}}, teacher_model=teacher)
    x = torch.randint(0, V, (2, T))
    seq, mask, _ = method._sampled(module, _batch(x))
    assert torch.equal(seq, sample_continuations(teacher, x[:, :3], T - 3, temperature=0.0))
    assert mask[:, 2:].all() and not mask[:, :2].any()


def _ranks(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """How many ids are strictly more probable than each of ``ids``: (B, n, V), (B, n) -> (B, n)."""
    return (logits > logits.gather(-1, ids[..., None])).sum(-1)


@pytest.mark.parametrize("k", [1, 3, V])
def test_interleaved_keeps_the_students_token_exactly_when_the_teacher_ranks_it_top_k(k):
    """SKD's rule, checked position by position with full forwards (no KV cache): the student's
    greedy proposal stays where the teacher ranks it among its k best, else the teacher's own
    token stands; k = 1 is the teacher's greedy path and k = V the student's."""
    student, teacher = _llama(0).eval(), _llama(1, layers=3).eval()
    prompts, P, n = torch.randint(0, V, (3, 4)), 4, 9
    seq, kept = interleaved_continuations(student, teacher, prompts, n, accept_top_k=k, temperature=0.0)
    assert seq.shape == (3, P + n) and kept.shape == (3, n) and torch.equal(seq[:, :P], prompts)
    with torch.no_grad():
        zs, zt = student(input_ids=seq).logits[:, P - 1:-1], teacher(input_ids=seq).logits[:, P - 1:-1]
    proposal = zs.argmax(-1)
    assert torch.equal(kept, _ranks(zt, proposal) < k)
    assert torch.equal(seq[:, P:], torch.where(kept, proposal, zt.argmax(-1)))
    if k == 1:
        assert torch.equal(seq, sample_continuations(teacher, prompts, n, temperature=0.0))
    if k == V:
        assert kept.all() and torch.equal(seq, sample_continuations(student, prompts, n, temperature=0.0))
    if k == 3:
        assert 0 < kept.sum() < kept.numel()  # both rules ran
    assert student.training is False and teacher.training is False  # modes put back as they were


def test_interleaved_sampling_is_seeded_and_stays_in_the_vocabulary():
    student, teacher = _llama(0, vocab=V + 16), _llama(1, layers=3)
    with torch.no_grad():
        student.lm_head.weight[V:] = 50.0  # padding rows that would win every draw
    prompts = torch.randint(0, V, (4, 3))
    draws = [interleaved_continuations(student, teacher, prompts, 15, accept_top_k=5, top_p=0.9, vocab_size=V,
                                       generator=torch.Generator().manual_seed(2)) for _ in range(2)]
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    assert draws[0][0].max() < V and student.training and teacher.training


def test_interleaved_source_in_the_stage(tmp_path):
    """source: interleaved scores the interleaved text on the sampled positions and logs the student's share."""
    teacher = _llama(1, layers=3)
    op = {"lmbda": 1.0, "source": "interleaved", "prompt_tokens": 3, "temperature": 0.0, "accept_top_k": 2}
    method, module = _method(tmp_path, {"on_policy": op}, teacher_model=teacher)
    x = torch.randint(0, V, (2, T))
    seq, mask, logs = method._sampled(module, _batch(x))
    want, kept = interleaved_continuations(module.student, teacher, x[:, :3], T - 3, accept_top_k=2, temperature=0.0)
    assert torch.equal(seq, want) and mask[:, 2:].all() and not mask[:, :2].any()
    assert logs["student_kept"] == kept.float().mean() and logs["on_policy"] == 1
    loss, logs = method.loss(module, _batch(x))
    assert "student_kept" in logs and loss.isfinite()


@pytest.mark.parametrize("stage", [{"loss": "forward_kl", "ce_weight": 0.5}, {"loss": "jsd", "top_k": 10},
                                   {"loss": "reverse_kl", "on_policy": {"lmbda": 1.0, "prompt_tokens": 4}}])
def test_chunked_stage_loss_equals_the_full_one(tmp_path, stage):
    x = torch.randint(0, V, (3, T))
    full, m_full = _method(tmp_path, stage)
    chunked, m_chunked = _method(tmp_path, {**stage, "chunk_tokens": 5})
    a, ga, la = _loss_and_grads(full, m_full, _batch(x))
    b, gb, lb = _loss_and_grads(chunked, m_chunked, _batch(x))
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    for u, w in zip(gb, ga):
        torch.testing.assert_close(u, w, rtol=0, atol=1e-5)
    assert la.keys() == lb.keys()


@pytest.mark.parametrize("stage", [{"loss": "forward_kl", "temperature": 2.0}, {"loss": "jsd", "beta": 0.3},
                                   {"loss": "reverse_kl", "on_policy": {"lmbda": 1.0, "prompt_tokens": 4}}])
def test_liger_backend_equals_our_full_loss(tmp_path, stage):
    """chunk_backend: liger runs Liger-Kernel's fused linear JSD (its real Triton kernel; in the
    interpreter on CPU): the value and gradients of our full-logit loss, masks included."""
    import os

    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py sets it without a GPU
    x = torch.randint(0, V, (3, T))
    full, m_full = _method(tmp_path, stage)
    liger, m_liger = _method(tmp_path, {**stage, "chunk_tokens": 5, "chunk_backend": "liger"})
    a, ga, la = _loss_and_grads(full, m_full, _batch(x))
    b, gb, lb = _loss_and_grads(liger, m_liger, _batch(x))
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for u, w in zip(gb, ga):
        torch.testing.assert_close(u, w, rtol=1e-4, atol=1e-5)
    assert la.keys() == lb.keys()


@pytest.mark.parametrize("stage,match", [
    ({"chunk_backend": "liger"}, "set chunk_tokens too"),
    ({"chunk_backend": "liger", "chunk_tokens": 8, "loss": "skew_kl"}, "does not take ['loss: skew_kl']"),
    ({"chunk_backend": "liger", "chunk_tokens": 8, "ce_weight": 0.5, "top_k": 8}, "does not take ['ce_weight', 'top_k']"),
])
def test_liger_backend_bad_options_fail_in_one_line(tmp_path, stage, match):
    with pytest.raises(CompressError, match=re.escape(match)):
        load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path, tmp_path / "out", stages=[{"kind": "distill", **stage}]))


def test_two_teachers_give_the_weighted_sum(tmp_path):
    t1, t2 = _llama(1, layers=3), _llama(2, layers=2)
    x = torch.randint(0, V, (2, T))
    both, m_both = _method(tmp_path, {"chunk_tokens": 7}, teacher_model=t1, extra=[(0.25, t2)])
    only1, m1 = _method(tmp_path, {}, teacher_model=t1)
    only2, m2 = _method(tmp_path, {}, teacher_model=copy.deepcopy(t2))
    loss, logs = both.loss(m_both, _batch(x))
    want = only1.loss(m1, _batch(x))[0] + 0.25 * only2.loss(m2, _batch(x))[0]
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-5)
    assert {"kd0", "kd1"} <= logs.keys()


@pytest.mark.parametrize("stage,train,match", [
    ({"on_policy": {"lmbda": 1.5}}, {}, "lmbda"),
    ({"on_policy": {"lmbda": -0.1}}, {}, "lmbda"),
    ({"on_policy": {}, "top_k": 8, "offline": {}}, {}, "drop offline or on_policy"),
    ({"on_policy": {}, "ce_weight": 1.0}, {}, "set ce_weight=0"),
    ({"on_policy": {"accept_top_k": 5}}, {}, "with source: student drop it"),
    ({"on_policy": {"source": "interleaved", "accept_top_k": 0}}, {}, "accept_top_k"),
])
def test_bad_on_policy_recipes_fail_at_load(tmp_path, stage, train, match):
    with pytest.raises(CompressError, match=match):
        load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path, tmp_path / "o", stages=[{"kind": "distill", **stage}],
                                 train=train))


def test_pipeline_run_with_on_policy_chunks_and_two_teachers(tiny_teacher, tmp_path):
    """A real run (DeepSpeed, the one loop): each step's on-policy draw is the recorded one, both
    teachers' terms are logged, and the export loads."""
    import json

    from transformers import AutoModelForCausalLM

    from tests.tiny import launch, make_tiny_model

    second = make_tiny_model(tmp_path / "teacher2", layers=2, hidden=64, seed=3)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, out, extra_teachers=[{"source": str(second), "weight": 0.5}],
                          train={"max_steps": 6},
                          stages=[{"kind": "distill", "loss": "jsd", "chunk_tokens": 16,
                                   "on_policy": {"lmbda": 0.5, "prompt_tokens": 8, "top_p": 0.9}}])
    p = launch(recipe)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(steps) == list(range(1, 7))
    want = [float(draw(0, s - 1, 0) < 0.5) for s in range(1, 7)]
    assert [steps[s]["on_policy"] for s in range(1, 7)] == want and 0 < sum(want) < 6
    assert all(r["kd0"] > 0 and r["kd1"] > 0 for r in steps.values())
    AutoModelForCausalLM.from_pretrained(out / "final")
