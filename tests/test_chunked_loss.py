"""Chunked KD from hidden states + LM heads: the naive loss's value and gradients, never (N, V) logits."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from compress.chunked_loss import KDTerms, chunked_head_loss, head_input_captured
from compress.losses import KD_LOSSES, kd_loss, teacher_topk

N_ROWS, V, D = 2, 96, 16


def _pair(bias=False):
    torch.manual_seed(0)
    h_s = (torch.randn(N_ROWS, 13, D) * 2).requires_grad_(True)
    head = nn.Linear(D, V, bias=bias)
    h_t, t_head = torch.randn(N_ROWS, 13, 24) * 2, nn.Linear(24, V)
    return h_s, head, h_t, t_head


def _terms_inputs(h_s, mask, labels):
    flat_mask = None if mask is None else mask.flatten()
    n = torch.tensor(h_s.shape[0] * h_s.shape[1]) if mask is None else mask.sum()
    return dict(mask=flat_mask, labels=None if labels is None else labels.flatten(), n_mask=n,
                n_labels=None if labels is None else (labels != -100).sum())


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("kind", KD_LOSSES)
@pytest.mark.parametrize("chunk", [1, 5, 26, 1000])  # 1 token, uneven chunks, exactly N, larger than N
def test_chunked_equals_naive_values_and_gradients(kind, chunk):
    h_s, head, h_t, t_head = _pair(bias=True)
    mask = torch.rand(N_ROWS, 13) > 0.3
    labels = torch.randint(0, V, (N_ROWS, 13))
    labels[0, :3] = -100
    terms = KDTerms(kind=kind, temperature=1.7, ce_weight=0.3)
    t_logits = t_head(h_t).detach().flatten(0, 1)
    kw = _terms_inputs(h_s, mask, labels)
    naive = terms(head(h_s).flatten(0, 1), [(0.8, {"teacher_logits": t_logits})], **kw)
    chunked = chunked_head_loss(h_s, head, lambda lg, rows: terms(lg, [(0.8, {"teacher_logits": t_logits[rows]})], rows, **kw),
                                chunk)
    want = 0.8 * kd_loss(head(h_s), t_head(h_t).detach(), kind=kind, temperature=1.7, mask=mask)
    want = want + 0.3 * torch.nn.functional.cross_entropy(head(h_s).flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(naive, want, rtol=0, atol=1e-5)  # KDTerms on full logits is kd_loss + CE
    torch.testing.assert_close(chunked, naive, rtol=0, atol=1e-5)
    params = [h_s, head.weight, head.bias]
    for a, b in zip(_grads(chunked * 2.5, params), _grads(naive * 2.5, params)):  # an upstream gradient scales
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_chunked_with_topk_offline_and_two_teachers():
    h_s, head, h_t, t_head = _pair()
    t1 = t_head(h_t).detach().flatten(0, 1)
    t2 = t1 * 0.5 + torch.randn_like(t1)
    ids, lp = teacher_topk(t2, 8, temperature=2.0)
    terms = KDTerms(kind="jsd", temperature=2.0, top_k=8)
    kw = _terms_inputs(h_s, None, None)

    def teachers(rows):
        return [(0.7, {"teacher_logits": t1[rows]}), (0.3, {"teacher_topk": (ids[rows], lp[rows]), "teacher_vocab": V})]

    naive = terms(head(h_s).flatten(0, 1), teachers(slice(None)), **kw)
    want = 0.7 * kd_loss(head(h_s), t1.view(N_ROWS, 13, V), kind="jsd", temperature=2.0, top_k=8) + \
        0.3 * kd_loss(head(h_s), teacher_topk=(ids.view(N_ROWS, 13, 8), lp.view(N_ROWS, 13, 8)), teacher_vocab=V,
                      kind="jsd", temperature=2.0)
    torch.testing.assert_close(naive, want, rtol=0, atol=1e-5)
    chunked = chunked_head_loss(h_s, head, lambda lg, rows: terms(lg, teachers(rows), rows, **kw), 7)
    torch.testing.assert_close(chunked, naive, rtol=0, atol=1e-5)
    for a, b in zip(_grads(chunked, [h_s, head.weight]), _grads(naive, [h_s, head.weight])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def _tiny_llama(seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                        initializer_range=0.5))


def test_chunked_through_a_real_model_with_tied_embeddings():
    """The head's input captured by the hook + chunked loss == the model's own logits into kd_loss, for
    every parameter's gradient (the tied embedding gets both of its gradients)."""
    student, teacher = _tiny_llama(0), _tiny_llama(1)
    x = torch.randint(0, V, (3, 11))
    t_logits = teacher(input_ids=x).logits.detach()
    naive = kd_loss(student(input_ids=x).logits, t_logits, kind="reverse_kl")
    g_naive = torch.autograd.grad(naive, list(student.parameters()))
    with head_input_captured(student) as box:
        out = student(input_ids=x)
    assert out.logits.shape[1] == 1  # the head saw one token per row inside the forward
    flat_t = t_logits.flatten(0, 1)
    terms = KDTerms(kind="reverse_kl")
    kw = _terms_inputs(x[..., None], None, None)
    chunked = chunked_head_loss(box["hidden"], student.get_output_embeddings(),
                                lambda lg, rows: terms(lg, [(1.0, {"teacher_logits": flat_t[rows]})], rows, **kw), 4)
    torch.testing.assert_close(chunked, naive, rtol=0, atol=1e-5)
    for a, b in zip(torch.autograd.grad(chunked, list(student.parameters())), g_naive):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_all_tokens_times_vocab_is_ever_made():
    h_s, head, h_t, t_head = _pair()
    n = h_s.shape[0] * h_s.shape[1]
    terms = KDTerms(kind="forward_kl")
    kw = _terms_inputs(h_s, None, None)
    h_t_flat = h_t.flatten(0, 1)

    def fn(lg, rows):
        with torch.no_grad():
            t = t_head(h_t_flat[rows])
        return terms(lg, [(1.0, {"teacher_logits": t})], rows, **kw)

    for chunk, expect_small in ((4, True), (n, False)):
        with _LargestTensor() as probe:
            chunked_head_loss(h_s, head, fn, chunk).backward()
        assert (probe.largest < n * V) == expect_small, (chunk, probe.largest, n * V)
        assert probe.largest >= (chunk * V if expect_small else n * V)
