"""compress.losses against float64 references written out term by term, plus invariants."""

import pytest
import torch
import torch.nn.functional as F

from compress.errors import CompressError
from compress.losses import KD_LOSSES, ce_loss, hidden_mse, kd_loss, teacher_topk

torch.manual_seed(0)

SHAPES = [(2, 8, 64), (3, 5, 37)]  # (B, T, V); the second is the weird one: odd B*T, V=37
BETA, ALPHA = 0.3, 0.2  # off-default so a swapped beta/alpha would show


def ref_divergence(p, q, kind, beta=BETA, alpha=ALPHA):
    """Per-token divergence (B, T) from probabilities (B, T, V), float64, explicit sums."""

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "skew_kl":
        return kl(p, alpha * p + (1 - alpha) * q)
    return kl(q, alpha * q + (1 - alpha) * p)


def ref_reduce(per_token, mask, temperature):
    w = torch.ones_like(per_token) if mask is None else mask.double()
    return (per_token * w).sum() / w.sum() * temperature**2


def ref_probs(s, t, temperature):
    return torch.softmax(t.double() / temperature, -1), torch.softmax(s.double() / temperature, -1)


def ref_topk_bins(p, q, k):
    """The k+1-bin reference: teacher's top-k ids plus one tail bin, for both."""
    ids = p.topk(k, -1).indices
    pk, qk = p.gather(-1, ids), q.gather(-1, ids)
    P = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)
    Q = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    return P, Q


def make(shape, scale=3.0):
    return torch.randn(shape) * scale, torch.randn(shape) * scale


def make_mask(shape):
    mask = torch.rand(shape[:2]) > 0.4
    mask[0, 0] = True  # never empty
    return mask


def loss(s, t, kind, **kw):
    return kd_loss(s, t, kind=kind, beta=BETA, skew_alpha=ALPHA, **kw)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", KD_LOSSES)
def test_matches_reference(kind, temperature, use_mask, shape):
    s, t = make(shape)
    mask = make_mask(shape) if use_mask else None
    got = loss(s, t, kind, temperature=temperature, mask=mask)
    p, q = ref_probs(s, t, temperature)
    want = ref_reduce(ref_divergence(p, q, kind), mask, temperature)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KD_LOSSES)
def test_zero_iff_equal(kind):
    s, t = make((3, 5, 37))
    assert loss(s, s.clone(), kind, temperature=2.0).abs() < 1e-6
    assert loss(s, t, kind, temperature=2.0) > 1e-3


def test_forward_kl_gradient():
    B, T, V = 3, 5, 37
    s, t = make((B, T, V))
    s.requires_grad_(True)
    kd_loss(s, t, kind="forward_kl").backward()
    want = (torch.softmax(s.detach(), -1) - torch.softmax(t, -1)) / (B * T)
    torch.testing.assert_close(s.grad, want, atol=1e-6, rtol=1e-4)


def test_jsd_half_is_symmetric():
    s, t = make((2, 8, 64))
    a = kd_loss(s, t, kind="jsd", beta=0.5, temperature=2.0)
    b = kd_loss(t, s, kind="jsd", beta=0.5, temperature=2.0)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_skew_kl_alpha_zero_is_forward_kl():
    s, t = make((2, 8, 64))
    fwd = kd_loss(s, t, kind="forward_kl", temperature=2.0)
    torch.testing.assert_close(kd_loss(s, t, kind="skew_kl", skew_alpha=0.0, temperature=2.0), fwd)
    rev = kd_loss(s, t, kind="reverse_kl", temperature=2.0)
    skew_rev = kd_loss(s, t, kind="skew_reverse_kl", skew_alpha=0.0, temperature=2.0)
    torch.testing.assert_close(skew_rev, rev)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KD_LOSSES)
def test_topk_full_vocab_equals_full_mode(kind, shape):
    s, t = make(shape)
    mask = make_mask(shape)
    full = loss(s, t, kind, temperature=2.0, mask=mask)
    topk = loss(s, t, kind, temperature=2.0, mask=mask, top_k=shape[-1])
    torch.testing.assert_close(topk, full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", KD_LOSSES)
def test_topk_matches_bin_reference(kind, temperature, k):
    shape = (3, 5, 37)
    s, t = make(shape)
    mask = make_mask(shape)
    got = loss(s, t, kind, temperature=temperature, mask=mask, top_k=k)
    P, Q = ref_topk_bins(*ref_probs(s, t, temperature), k)
    want = ref_reduce(ref_divergence(P, Q, kind), mask, temperature)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KD_LOSSES)
def test_teacher_topk_cache_equals_top_k(kind):
    s, t = make((3, 5, 37))
    ids, logprobs = teacher_topk(t, 6, temperature=2.0)
    assert ids.shape == logprobs.shape == (3, 5, 6) and ids.dtype == torch.long
    cached = loss(s, None, kind, temperature=2.0, teacher_topk=(ids, logprobs), teacher_vocab=37)
    online = loss(s, t, kind, temperature=2.0, top_k=6)
    torch.testing.assert_close(cached, online, atol=0, rtol=0)


PADS = {"random": lambda *shape: torch.randn(shape) * 10, "+20": lambda *shape: torch.full(shape, 20.0)}


@pytest.mark.parametrize("pad", PADS)
@pytest.mark.parametrize("top_k", [None, 5])
@pytest.mark.parametrize("kind", KD_LOSSES)
def test_vocab_padding_is_ignored(kind, top_k, pad):
    B, T, V = 3, 5, 37
    s, t = make((B, T, V))
    rows = PADS[pad](B, T, 8)
    want = loss(s, t, kind, temperature=2.0, top_k=top_k)
    padded_teacher = loss(s, torch.cat([t, rows], -1), kind, temperature=2.0, top_k=top_k)
    padded_student = loss(torch.cat([s, rows], -1), t, kind, temperature=2.0, top_k=top_k)
    torch.testing.assert_close(padded_teacher, want, atol=0, rtol=0)
    torch.testing.assert_close(padded_student, want, atol=0, rtol=0)


@pytest.mark.parametrize("pad", PADS)
@pytest.mark.parametrize("kind", KD_LOSSES)
def test_offline_kd_ignores_student_padding_like_online(kind, pad):
    """A student with Vs = V + 8 padding rows: offline (cached top-k) == online top-k == unpadded."""
    B, T, V, k = 3, 5, 37, 5
    s, t = make((B, T, V))
    padded = torch.cat([s, PADS[pad](B, T, 8)], -1)
    cache = teacher_topk(t, k, temperature=2.0)
    offline = loss(padded, None, kind, temperature=2.0, teacher_topk=cache, teacher_vocab=V)
    online = loss(padded, t, kind, temperature=2.0, top_k=k)
    unpadded = loss(s, None, kind, temperature=2.0, teacher_topk=cache, teacher_vocab=V)
    torch.testing.assert_close(offline, online, atol=0, rtol=0)
    torch.testing.assert_close(offline, unpadded, atol=0, rtol=0)


def test_low_precision_inputs_compute_in_float32():
    s, t = make((2, 8, 64))
    s16, t16 = s.bfloat16(), t.bfloat16()
    got = kd_loss(s16, t16, kind="jsd", temperature=2.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, kd_loss(s16.float(), t16.float(), kind="jsd", temperature=2.0))


def extreme_logits(shape):
    """Random ±1e4 spikes on top of normal logits."""
    x = torch.randn(shape)
    spikes = torch.rand(shape)
    x[spikes < 0.1] = -1e4
    x[spikes > 0.95] = 1e4
    return x


@pytest.mark.parametrize("top_k", [None, 4])
@pytest.mark.parametrize("kind", KD_LOSSES)
def test_extreme_logits_are_finite(kind, top_k):
    shape = (3, 5, 37)
    s = extreme_logits(shape).requires_grad_(True)
    t = extreme_logits(shape)
    out = kd_loss(s, t, kind=kind, top_k=top_k)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()


# top_k=30 > the 20 ids the teacher allows: zeros inside the top-k; offline KD is top-k only
@pytest.mark.parametrize("top_k, offline", [(None, False), (4, False), (30, False), (4, True), (30, True)])
@pytest.mark.parametrize("kind", KD_LOSSES)
def test_teacher_zero_probabilities_give_finite_loss(kind, top_k, offline):
    """A teacher that masks out part of its vocab (-inf logits, p = 0): finite loss and gradient.

    The exact KL(q || p) is infinite there; the loss floors p at float32's smallest normal.
    """
    shape = (3, 5, 37)
    s = torch.randn(shape, requires_grad=True)
    t = torch.randn(shape)
    t[..., 20:] = float("-inf")
    if offline:
        ids, logprobs = teacher_topk(t, top_k)
        out = kd_loss(s, kind=kind, teacher_topk=(ids, logprobs.half()), teacher_vocab=37)  # fp16, as cached
    else:
        out = kd_loss(s, t, kind=kind, top_k=top_k)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all(), out
    assert out > 0


def test_empty_mask_gives_zero():
    s, t = make((2, 8, 64))
    assert kd_loss(s, t, mask=torch.zeros(2, 8, dtype=torch.bool)) == 0


def test_ce_loss_matches_torch():
    logits = torch.randn(3, 5, 37)
    labels = torch.randint(0, 37, (3, 5))
    labels[0, :2] = -100
    want = F.cross_entropy(logits.double().flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(ce_loss(logits, labels).double(), want, atol=1e-6, rtol=1e-5)
    assert ce_loss(logits, torch.full((3, 5), -100)) == 0


@pytest.mark.parametrize("use_mask", [False, True])
def test_hidden_mse(use_mask):
    B, T, Ds, Dt = 3, 5, 12, 16
    hs, ht = torch.randn(B, T, Ds), torch.randn(B, T, Dt)
    proj = torch.nn.Linear(Ds, Dt)
    mask = make_mask((B, T)) if use_mask else None
    got = hidden_mse(hs, ht, proj=proj, mask=mask)
    per_token = ((proj(hs) - ht) ** 2).mean(-1).double()
    torch.testing.assert_close(got.double(), ref_reduce(per_token, mask, 1.0), atol=1e-6, rtol=1e-5)
    assert hidden_mse(ht, ht.clone()) == 0


S, T_ = torch.randn(2, 3, 10), torch.randn(2, 3, 10)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: kd_loss(S, T_, kind="kl"), "kind"),
        (lambda: kd_loss(S, T_, kind="jsd", beta=0.0), "beta"),
        (lambda: kd_loss(S, T_, kind="jsd", beta=1.0), "beta"),
        (lambda: kd_loss(S, T_, skew_alpha=1.0), "skew_alpha"),
        (lambda: kd_loss(S, T_, temperature=0.0), "temperature"),
        (lambda: kd_loss(S, T_, temperature=-1.0), "temperature"),
        (lambda: kd_loss(S, T_, top_k=0), "top_k"),
        (lambda: kd_loss(S, T_, top_k=11), "top_k"),
        (lambda: kd_loss(S), "teacher_logits"),
        (lambda: kd_loss(S, T_, mask=torch.ones(3, 2)), "mask"),
        (lambda: kd_loss(S, T_[:1]), "teacher_logits"),
        (lambda: kd_loss(S, T_, teacher_topk=teacher_topk(T_, 2)), "teacher_topk"),
        (lambda: kd_loss(S, teacher_topk=teacher_topk(T_, 2), top_k=3, teacher_vocab=10), "top_k"),
        (lambda: kd_loss(S[..., :5], teacher_topk=teacher_topk(T_, 9), teacher_vocab=10), "teacher_topk"),
        (lambda: kd_loss(S, teacher_topk=teacher_topk(T_, 9), teacher_vocab=4), "teacher_topk"),
        (lambda: kd_loss(S, teacher_topk=teacher_topk(T_, 2)), "teacher_vocab"),
        (lambda: kd_loss(S, T_, teacher_vocab=9), "teacher_vocab"),
        (lambda: teacher_topk(T_, 0), "k"),
        (lambda: ce_loss(S, torch.zeros(2, 4, dtype=torch.long)), "labels"),
        (lambda: hidden_mse(torch.randn(2, 3, 4), torch.randn(2, 3, 5)), "proj"),
    ],
)
def test_bad_arguments_raise(call, name):
    with pytest.raises(CompressError, match=name) as err:
        call()
    assert "\n" not in str(err.value)
