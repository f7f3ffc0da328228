"""compress.cross_tokenizer: ULD / GOLD against references written out by hand, and alignment on the
real SmolLM2 (teacher, byte-level BPE) and Mistral-7B-v0.1 (student, SentencePiece) tokenizers."""

import numpy as np
import pytest
import torch

from compress import cross_tokenizer as ct
from compress.cross_tokenizer import (align_batch, align_positions, aligned_logits, gold_loss, load_student_tokenizer,
                                      sorted_l1, text_spans, token_bytes, uld_loss, vocab_overlap)
from compress.errors import CompressError
from compress.models import load_tokenizer

torch.manual_seed(0)

TEXT = (
    "Héllo wörld! The café served crème brûlée; naïve coöperation, 1234.5678 and 日本語のテキスト ☃ 🤗🤗.\n\n"
    "def fibonacci(n: int) -> int:\n"
    "    if n < 2:\n\t\treturn n   # tabs, then    spaces\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\n\n"
    "   Leading spaces, trailing spaces   \n"
    "Ünïcödé: Ελληνικά, русский, عربى, emoji 👩‍👩‍👧 and a URL https://example.org/a?b=c&d=e#f.\n"
    "The quick brown fox jumps over the lazy dog. Ünterminated <s> and </s> and <|im_end|> as plain text."
)


@pytest.fixture(scope="module")
def teacher_tok():
    from compress.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def student_tok():
    return load_student_tokenizer("mistral-7b-v0.1")


# ---- ULD ----------------------------------------------------------------------------------------

def ref_uld(zs, zt, temperature, mask=None):
    """Per the paper, with explicit Python loops in float64: sort each distribution, pad, L1."""
    zs, zt = zs.detach().double().numpy(), zt.detach().double().numpy()
    rows = []
    for a, b in zip(zs, zt):
        pa, pb = np.exp(a / temperature - np.max(a / temperature)), np.exp(b / temperature - np.max(b / temperature))
        pa, pb = sorted(pa / pa.sum(), reverse=True), sorted(pb / pb.sum(), reverse=True)
        n = max(len(pa), len(pb))
        pa, pb = pa + [0.0] * (n - len(pa)), pb + [0.0] * (n - len(pb))
        rows.append(sum(abs(x - y) for x, y in zip(pa, pb)))
    w = np.ones(len(rows)) if mask is None else mask.numpy().astype(float)
    return float((np.array(rows) * w).sum() / w.sum())


@pytest.mark.parametrize("vs,vt", [(37, 53), (64, 64), (50, 9)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_uld_matches_loop_reference_and_has_gradients(vs, vt, temperature):
    zs = (torch.randn(7, vs) * 3).requires_grad_()
    zt = torch.randn(7, vt) * 3
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    loss = uld_loss(zs, zt, temperature=temperature, mask=mask)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_uld(zs, zt, temperature, mask), abs=1e-6)
    loss.backward()
    assert torch.isfinite(zs.grad).all()
    assert zs.grad[~mask].abs().max() == 0 and zs.grad[mask].abs().sum(-1).min() > 0
    # the same gradient from a float64 form that gathers by argsort instead of sorting values
    z = zs.detach().double().requires_grad_()
    ps, pt = torch.softmax(z / temperature, -1), torch.softmax(zt.double() / temperature, -1)
    ss, st = ps.gather(-1, ps.argsort(-1, descending=True)), pt.sort(-1, descending=True).values
    pad = max(vs, vt)
    ss, st = torch.nn.functional.pad(ss, (0, pad - vs)), torch.nn.functional.pad(st, (0, pad - vt))
    ((ss - st).abs().sum(-1)[mask].mean()).backward()
    torch.testing.assert_close(zs.grad.double(), z.grad, atol=1e-6, rtol=1e-4)


def test_uld_zero_iff_sorted_distributions_equal():
    z = torch.randn(5, 41)
    perm = torch.randperm(41)
    assert uld_loss(z, z).item() == pytest.approx(0, abs=1e-7)
    assert uld_loss(z, z[:, perm]).item() == pytest.approx(0, abs=1e-6)  # another vocabulary order: still 0
    padded = torch.cat([z, torch.full((5, 3), -1e4)], -1)  # extra ids with zero probability: still 0
    assert uld_loss(z, padded).item() == pytest.approx(0, abs=1e-6)
    other = z.clone()
    other[:, 0] += 0.5  # a different multiset of probabilities
    assert uld_loss(z, other[:, perm]).item() > 1e-3


def test_uld_top_k_is_exact_when_wide_and_a_lower_bound_when_narrow():
    zs, zt = torch.randn(6, 40) * 2, torch.randn(6, 70) * 2
    exact = uld_loss(zs, zt)
    assert uld_loss(zs, zt, top_k=70).item() == pytest.approx(exact.item(), abs=1e-7)
    for k in (1, 5, 39):
        assert uld_loss(zs, zt, top_k=k).item() <= exact.item() + 1e-6
    # a sharp student against a flat teacher: the student's sorted tail is everywhere below the
    # teacher's, so |tail mass difference| is the exact tail sum and top-k is exact too
    sharp, flat = torch.zeros(2, 30), torch.zeros(2, 30)
    sharp[:, 0] = 8.0
    assert uld_loss(sharp, flat, top_k=4).item() == pytest.approx(uld_loss(sharp, flat).item(), abs=1e-6)


@pytest.mark.parametrize("k", [1, 8, 40])
def test_uld_from_cached_topk_equals_uld_top_k(k):
    """An offline teacher is its top-k log-probs at T: ULD from them is ``uld_loss(top_k=k)`` on the
    teacher's logits, in value and in the student's gradient, masked rows left out."""
    from compress.cross_tokenizer import uld_loss_topk
    from compress.losses import teacher_topk

    zs, zt = (torch.randn(6, 40) * 2).requires_grad_(), torch.randn(6, 70) * 2
    mask = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)
    _, lp = teacher_topk(zt[None], k, 2.0)
    got = uld_loss_topk(zs, lp[0], temperature=2.0, mask=mask)
    want = uld_loss(zs, zt, temperature=2.0, mask=mask, top_k=k)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.autograd.grad(got, zs)[0], torch.autograd.grad(want, zs)[0])
    with pytest.raises(CompressError, match="wider than the student's vocabulary"):
        uld_loss_topk(zs[:, :5], lp[0, :, :6] if k >= 6 else torch.zeros(6, 6))


def test_sorted_l1_pads_the_shorter_side():
    ps = torch.tensor([[0.5, 0.3, 0.2]])
    pt = torch.tensor([[0.1, 0.6, 0.1, 0.1, 0.1]])
    # sorted: [.5,.3,.2,0,0] vs [.6,.1,.1,.1,.1] -> .1+.2+.1+.1+.1
    assert sorted_l1(ps, pt).item() == pytest.approx(0.6, abs=1e-7)


# ---- GOLD ---------------------------------------------------------------------------------------

def ref_forward_kl(zs, zt, temperature):
    p, q = torch.softmax(zt.double() / temperature, -1), torch.softmax(zs.double() / temperature, -1)
    return (p * (p.log() - q.log())).sum(-1).mean().item()


def test_gold_is_forward_kl_for_identical_full_vocabularies(teacher_tok):
    s_ids, t_ids = vocab_overlap(teacher_tok, teacher_tok, include_special=True)
    V = len(teacher_tok)
    assert torch.equal(s_ids, torch.arange(V)) and torch.equal(t_ids, torch.arange(V))
    zs, zt = torch.randn(3, V) * 2, torch.randn(3, V) * 2
    got = gold_loss(zs, zt, (s_ids, t_ids), temperature=1.5, rest_weight=7.0)  # no rest: its weight is moot
    assert got.item() == pytest.approx(ref_forward_kl(zs, zt, 1.5), rel=1e-4)


def test_gold_partial_overlap_matches_reference():
    Vs, Vt = 12, 15
    zs, zt = (torch.randn(4, Vs) * 2).requires_grad_(), torch.randn(4, Vt) * 2
    s_ids, t_ids = torch.tensor([0, 3, 4, 9, 11]), torch.tensor([14, 2, 0, 5, 7])
    got = gold_loss(zs, zt, (s_ids, t_ids), temperature=2.0, match_weight=0.7, rest_weight=0.4)
    got.backward()
    assert torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0
    want = 0.0
    for a, b in zip(zs.detach().double() / 2.0, zt.double() / 2.0):
        qa, qb = torch.softmax(a[s_ids], -1), torch.softmax(b[t_ids], -1)
        kl = sum(qb[i] * (qb[i].log() - qa[i].log()) for i in range(len(s_ids)))
        pa, pb = torch.softmax(a, -1).tolist(), torch.softmax(b, -1).tolist()
        ra = [pa[i] for i in range(Vs) if i not in s_ids.tolist()]
        rb = [pb[i] for i in range(Vt) if i not in t_ids.tolist()]
        want += 0.7 * kl.item() + 0.4 * ref_uld_probs(ra, rb)
    assert got.item() == pytest.approx(want / 4, abs=1e-5)


def ref_uld_probs(pa, pb):
    pa, pb = sorted(pa, reverse=True), sorted(pb, reverse=True)
    n = max(len(pa), len(pb))
    return sum(abs(x - y) for x, y in zip(pa + [0.0] * (n - len(pa)), pb + [0.0] * (n - len(pb))))


def test_gold_zero_when_teacher_is_the_student_under_the_id_map():
    zs = torch.randn(3, 20)
    perm = torch.randperm(20)
    zt = torch.empty_like(zs)
    zt[:, perm] = zs  # teacher id perm[i] is student id i
    assert gold_loss(zs, zt, (torch.arange(20), perm)).item() == pytest.approx(0, abs=1e-6)


# ---- tokenizers: bytes, alignment, overlap ------------------------------------------------------

def test_student_tokenizer_is_sentencepiece_exact(student_tok):
    # ids from sentencepiece 0.2.3 on the same model file (the package is not a dependency)
    text = "Héllo wörld!  def f(x):\n\treturn x  # 日本語 ☃ 🤗"
    assert student_tok(text, add_special_tokens=False)["input_ids"] == [
        382, 28797, 584, 28709, 275, 2024, 417, 28808, 28705, 801, 285, 28732, 28744, 1329, 13, 12, 807, 1318,
        28705, 422, 28705, 29142, 29119, 30321, 28705, 31666, 28705, 243, 162, 167, 154]
    assert student_tok("  two leading spaces", add_special_tokens=False)["input_ids"] == [259, 989, 5374, 10599]
    assert len(student_tok) == 32000 and student_tok.eos_token == "</s>"


def test_student_tokenizer_file_is_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(ct, "TOKENIZER_DIR", tmp_path)
    with pytest.raises(CompressError, match="setup.sh"):
        load_student_tokenizer("mistral-7b-v0.1")
    (tmp_path / "mistral-7b-v0.1.model").write_bytes(b"not a model")
    with pytest.raises(CompressError, match="sha256"):
        load_student_tokenizer("mistral-7b-v0.1")


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_token_bytes_rebuild_the_text(side, student_tok, teacher_tok):
    tok = student_tok if side == "student" else teacher_tok
    ids = tok(TEXT, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    stream = b"".join(token_bytes(tok)[i] for i in ids)
    assert stream in (TEXT.encode(), b" " + TEXT.encode())  # SentencePiece adds one dummy-prefix space
    assert stream.decode().lstrip(" ") == tok.decode(ids).lstrip(" ")


def test_hand_checked_alignment(student_tok, teacher_tok):
    text = "Héllo wörld"
    s_ids, t_ids, s_pos, t_pos = align_positions(text, student_tok, teacher_tok)
    assert student_tok.convert_ids_to_tokens(s_ids.tolist()) == ["▁H", "é", "ll", "o", "▁w", "ör", "ld"]
    assert teacher_tok.convert_ids_to_tokens(t_ids.tolist()) == ["H", "Ã©", "llo", "Ġw", "Ã¶r", "ld"]
    # byte ends: student 1,3,5,6,8,11,13; teacher 1,3,6,8,11,13 -> 'll' (ends at 5) has no partner
    assert s_pos.tolist() == [0, 1, 3, 4, 5, 6] and t_pos.tolist() == [0, 1, 2, 3, 4, 5]


def _byte_ends(tok, text):
    """Ends from the tokenizer's own char offsets (independent of token_bytes); None inside a character."""
    enc = tok(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    data = text.encode()
    ends = [len(text[:e].encode()) for _, e in enc["offset_mapping"]]
    return enc["input_ids"], ends, data


def test_alignment_on_real_text_pairs_end_at_the_same_offset(student_tok, teacher_tok):
    s_ids, t_ids, s_pos, t_pos = align_positions(TEXT, student_tok, teacher_tok)
    sb, tb = token_bytes(student_tok), token_bytes(teacher_tok)
    s_stream = [b"".join(sb[i] for i in s_ids[: k + 1].tolist()).removeprefix(b" ") for k in range(len(s_ids))]
    t_stream = [b"".join(tb[i] for i in t_ids[: k + 1].tolist()) for k in range(len(t_ids))]
    for s, t in zip(s_pos.tolist(), t_pos.tolist()):
        assert s_stream[s] == t_stream[t]  # the same text precedes both predictions
    # against the tokenizers' own offsets, where a pair ends between characters
    _, s_off, data = _byte_ends(student_tok, TEXT)
    _, t_off, _ = _byte_ends(teacher_tok, TEXT)
    checked = 0
    for s, t in zip(s_pos.tolist(), t_pos.tolist()):
        end = len(t_stream[t])
        if data[end:end + 1] and data[end] & 0xC0 == 0x80:
            continue  # inside a character: char offsets cannot say
        assert s_off[s] == t_off[t] == end
        checked += 1
    # complete: every byte where both have a token boundary is paired
    s_ends = {len(x) for x in s_stream}
    t_ends = {len(x) for x in t_stream}
    assert len(s_pos) == len((s_ends & t_ends) - {0})
    assert checked > 0.8 * len(s_pos) and len(s_pos) > 0.6 * len(s_ids)
    # mid-character pairs exist too (both split the 4-byte emoji into bytes)
    assert any(data[len(t_stream[t]):][:1] and data[len(t_stream[t])] & 0xC0 == 0x80 for t in t_pos.tolist())


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_identical_tokenizers_align_every_position(side, student_tok, teacher_tok):
    tok = student_tok if side == "student" else teacher_tok
    s_ids, t_ids, s_pos, t_pos = align_positions(TEXT, tok, tok)
    assert torch.equal(s_ids, t_ids)
    assert s_pos.tolist() == t_pos.tolist() == list(range(len(s_ids)))


def test_align_positions_truncates_the_teacher_to_the_student_block(student_tok, teacher_tok):
    s_ids, t_ids, s_pos, t_pos = align_positions(TEXT, student_tok, teacher_tok, max_student_len=20)
    sb, tb = token_bytes(student_tok), token_bytes(teacher_tok)
    covered = len(b"".join(sb[i] for i in s_ids.tolist())) - 1  # minus the dummy prefix
    assert len(s_ids) == 20 and len(b"".join(tb[i] for i in t_ids.tolist())) <= covered
    assert s_pos.max() == 19 or t_pos.max() == len(t_ids) - 1


def _student_block(tok, T, B):
    docs = TEXT.split("\n\n")
    ids = []
    for d in docs:
        ids += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = ids[3 : 3 + B * T]  # start mid-document
    return torch.tensor(ids).view(B, T)


def test_align_batch_pairs_see_the_same_continuation(student_tok, teacher_tok):
    ids = _student_block(student_tok, T=24, B=4)
    out = align_batch(ids, student_tok, teacher_tok)
    sb, tb = token_bytes(student_tok), token_bytes(teacher_tok)
    SEP = b"\xff"  # never in UTF-8 text: stands for a special token on either side

    def stream(table, row, eos):
        return [SEP if i == eos else table[i] for i in row]

    assert out["teacher_ids"].shape[0] == 4 and out["s_pos"].shape == out["pair_mask"].shape
    for b in range(4):
        n_t = int(out["teacher_mask"][b].sum())
        assert out["teacher_mask"][b, :n_t].all() and not out["teacher_mask"][b, n_t:].any()
        assert (out["teacher_ids"][b, n_t:] == teacher_tok.pad_token_id).all()
        s = stream(sb, ids[b].tolist(), student_tok.eos_token_id)
        t = stream(tb, out["teacher_ids"][b, :n_t].tolist(), teacher_tok.eos_token_id)
        pairs = out["pair_mask"][b]
        assert pairs.sum() > 0.6 * ids.shape[1]
        for sp, tp in zip(out["s_pos"][b][pairs].tolist(), out["t_pos"][b][pairs].tolist()):
            s_rest, t_rest = b"".join(s[sp + 1 :]), b"".join(t[tp + 1 :])
            assert s_rest.startswith(t_rest) and len(s_rest) - len(t_rest) <= 3  # a cut character at most
            assert (s[sp] == SEP) == (t[tp] == SEP)  # a separator pairs with the teacher's EOS
    with pytest.raises(CompressError, match="B, T"):
        align_batch(ids[0], student_tok, teacher_tok)
    cut = align_batch(ids, student_tok, teacher_tok, max_teacher_len=10)
    assert cut["teacher_ids"].shape[1] == 10 and (cut["t_pos"][cut["pair_mask"]] < 10).all()


def test_align_batch_byte_level_student_cut_inside_characters(teacher_tok, student_tok):
    # SmolLM2 as the student: the row edges fall inside multi-byte characters; those bytes are trimmed
    ids = teacher_tok("日本語のテキスト ☃ 🤗 done", add_special_tokens=False)["input_ids"]
    row = torch.tensor(ids[1:-1])[None]
    assert token_bytes(teacher_tok)[ids[1]][0] & 0xC0 == 0x80  # really starts mid-character
    out = align_batch(row, teacher_tok, student_tok)
    assert out["pair_mask"].sum() >= 5
    zs, zt = aligned_logits(torch.randn(1, row.shape[1], 7), torch.randn(1, out["teacher_ids"].shape[1], 5), out)
    assert zs.shape == (int(out["pair_mask"].sum()), 7) and zt.shape == (zs.shape[0], 5)


def test_aligned_logits_gathers_the_paired_rows():
    batch = {"s_pos": torch.tensor([[0, 2], [1, 0]]), "t_pos": torch.tensor([[1, 3], [0, 0]]),
             "pair_mask": torch.tensor([[True, True], [True, False]])}
    zs = torch.arange(2 * 3).float().view(2, 3, 1).expand(2, 3, 4)
    zt = torch.arange(2 * 4).float().view(2, 4, 1).expand(2, 4, 2)
    a, b = aligned_logits(zs, zt, batch)
    assert a[:, 0].tolist() == [0, 2, 4] and b[:, 0].tolist() == [1, 3, 4]


def test_vocab_overlap_on_the_real_pair(student_tok, teacher_tok):
    s_ids, t_ids = vocab_overlap(student_tok, teacher_tok)
    assert len(s_ids) > 15000  # 21,755 for Mistral-7B-v0.1 x SmolLM2
    assert len(set(s_ids.tolist())) == len(s_ids) and len(set(t_ids.tolist())) == len(t_ids)
    s_tok, t_tok = student_tok.convert_ids_to_tokens, teacher_tok.convert_ids_to_tokens
    pairs = dict(zip(s_tok(s_ids.tolist()), t_tok(t_ids.tolist())))
    assert pairs["▁the"] == "Ġthe" and pairs["<0x0A>"] == "Ċ" and pairs["</s>"] == "<|im_end|>"
    for s, t in zip(s_ids.tolist(), t_ids.tolist()):
        if s == student_tok.eos_token_id:
            continue
        a, b = student_tok.decode([s]), teacher_tok.decode([t])  # SentencePiece drops a leading space
        assert b == a or (b == " " + a and s_tok(s).startswith("▁")), (s_tok(s), t_tok(t))


def test_text_spans_fall_back_to_offsets_when_the_normalizer_changes_text(student_tok):
    from tokenizers import normalizers

    nfc = load_student_tokenizer("mistral-7b-v0.1")
    nfc.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), nfc.backend_tokenizer.normalizer])
    text = "un cafe\u0301 noir"  # 'e' + combining acute: NFC makes it one character, so the bytes differ
    ids, ends = text_spans(nfc, text)
    assert b"".join(token_bytes(nfc)[i] for i in ids) != b" " + text.encode()
    data = text.encode()
    assert ends[-1] == len(data) and ends == sorted(ends)
    assert nfc.convert_ids_to_tokens(ids) == ["▁un", "▁café", "▁no", "ir"]
    # '▁café' ends after the combining accent, which no token's char offsets cover
    assert [data[:e].decode() for e in ends] == ["un", "un cafe\u0301", "un cafe\u0301 no", text]
    assert text_spans(student_tok, "un café noir")[1][-1] == len("un café noir".encode())  # NFC text: exact path


def test_bad_shapes_raise_compress_error():
    z = torch.randn(4, 10)
    with pytest.raises(CompressError, match="leading dims"):
        uld_loss(z, torch.randn(5, 10))
    with pytest.raises(CompressError, match="mask"):
        uld_loss(z, z, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(CompressError, match="temperature"):
        uld_loss(z, z, temperature=0)
    with pytest.raises(CompressError, match="overlap"):
        gold_loss(z, z, (torch.tensor([0, 1]), torch.tensor([0])))
    with pytest.raises(CompressError, match="exceed"):
        gold_loss(z, z, (torch.tensor([0, 10]), torch.tensor([0, 1])))
    with pytest.raises(CompressError, match="aligned_logits"):
        aligned_logits(z, z, {"s_pos": torch.zeros(1, 1, dtype=torch.long), "t_pos": torch.zeros(1, 1, dtype=torch.long),
                              "pair_mask": torch.ones(1, 1, dtype=torch.bool)})


# ---- the distill stage across tokenizers (student.tokenizer + distill.cross_tokenizer) -------------

def test_new_vocabulary_copies_shared_rows_and_ties_the_head(tiny_teacher):
    from transformers import AutoModelForCausalLM

    from compress.models import new_vocabulary

    t_tok = load_tokenizer(str(tiny_teacher))
    s_tok = load_student_tokenizer("mistral-7b-v0.1")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    old = teacher.get_input_embeddings().weight.detach().clone()
    student = new_vocabulary(AutoModelForCausalLM.from_pretrained(tiny_teacher), t_tok, s_tok)
    emb = student.get_input_embeddings().weight
    assert emb.shape == (32000, old.shape[1]) and student.config.vocab_size == 32000
    assert student.get_output_embeddings().weight is emb  # tied, as the teacher's
    assert student.config.eos_token_id == s_tok.eos_token_id
    s_ids, t_ids = vocab_overlap(s_tok, t_tok)
    assert torch.equal(emb[s_ids], old[t_ids])
    the = s_tok.convert_tokens_to_ids("▁the")
    assert torch.equal(emb[the], old[t_tok.convert_tokens_to_ids("Ġthe")])
    x = torch.tensor([s_tok("def f(x): return x", add_special_tokens=False)["input_ids"]])
    assert student(input_ids=x).logits.shape == (1, x.shape[1], 32000)


def test_a_tokenizer_mismatch_needs_cross_tokenizer_on_every_teacher_stage(tiny_teacher, tmp_path):
    from compress.errors import CompressError
    from compress.models import check_fit
    from compress.recipe import load_recipe
    from tests.tiny import write_recipe

    def fit(stages):
        check_fit(load_recipe(write_recipe(tmp_path / "r.yaml", tiny_teacher, tmp_path / "o", stages=stages,
                                           student={"init": "drop_layers", "tokenizer": "mistral-7b-v0.1"})))

    with pytest.raises(CompressError, match=r"tokenizers differ.*stage 0 \(distill\).*set cross_tokenizer"):
        fit([{"kind": "distill"}])
    with pytest.raises(CompressError, match=r"stage 1 \(distill\)"):
        fit([{"kind": "distill", "cross_tokenizer": {"method": "uld"}}, {"kind": "distill"}])
    with pytest.raises(CompressError, match=r"\['ppl_ratio_max', 'acceptance_min'\] compare .* use gates.bpb_ratio_max"):
        fit([{"kind": "eval", "tasks": [], "gates": {"ppl_ratio_max": 2, "acceptance_min": 0.3}}])
    fit([{"kind": "distill", "cross_tokenizer": {"method": "gold"}}, {"kind": "finetune"}])  # no error
    fit([{"kind": "eval", "tasks": [], "gates": {"bpb_ratio_max": 2}}])  # eval compares the pair in bits per byte


def test_bits_per_byte_counts_each_sides_own_tokens_and_bytes(tiny_teacher, teacher_tok):
    """Same model, same tokenizer on both sides: the student side is the model's nats per token
    (pair_metrics) over the bytes of the predicted tokens, and the teacher side, which re-tokenizes
    each block's text, lands on the same bits per byte up to how the block edges re-tokenize."""
    import math

    from transformers import AutoModelForCausalLM

    from compress.metrics import bits_per_byte, pair_metrics

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    fn = lambda x: model(input_ids=x).logits  # noqa: E731
    ids = torch.tensor(teacher_tok(TEXT * 3, add_special_tokens=False)["input_ids"])
    blocks = ids[: len(ids) // 33 * 33].reshape(-1, 33)
    m = bits_per_byte(fn, fn, blocks, teacher_tok, teacher_tok, batch_size=4)
    with torch.no_grad():
        ppl = pair_metrics(fn, None, blocks, batch_size=4)["student_ppl"]
    table = token_bytes(teacher_tok)
    n_bytes = sum(len(table[i]) for i in blocks[:, 1:].flatten().tolist())
    assert m["eval_bytes"] == n_bytes
    assert m["student_bpb"] == pytest.approx(math.log(ppl) * blocks[:, 1:].numel() / n_bytes / math.log(2), rel=1e-6)
    assert m["teacher_bpb"] == pytest.approx(m["student_bpb"], rel=0.02) and m["bpb_ratio"] == pytest.approx(1, rel=0.02)
    uniform = bits_per_byte(lambda x: torch.zeros(*x.shape, len(teacher_tok)), fn, blocks, teacher_tok, teacher_tok)
    assert uniform["student_bpb"] == pytest.approx(blocks[:, 1:].numel() * math.log2(len(teacher_tok)) / n_bytes, rel=1e-6)
    assert uniform["teacher_bpb"] == pytest.approx(m["teacher_bpb"], rel=1e-9)
    assert uniform["bpb_ratio"] == pytest.approx(uniform["student_bpb"] / m["teacher_bpb"], rel=1e-9)


def llama(seed, vocab, width=16):
    """A tiny random Llama (2 layers) with ``vocab`` ids: a teacher or student for the loss tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, initializer_range=0.5,
                                        tie_word_embeddings=True, max_position_embeddings=256))


@pytest.mark.parametrize("method,ce,extra", [("uld", 0.0, False), ("gold", 0.3, True)])
@pytest.mark.parametrize("smooth", [True, False])
def test_chunked_cross_tokenizer_loss_equals_the_full_one(tmp_path, student_tok, teacher_tok, method, ce, extra, smooth,
                                                          monkeypatch):
    """``chunk_tokens`` with ``cross_tokenizer``: the same value and gradients as the full logits,
    over chunks that cut through rows and hold no aligned pair at all (chunk of 1), with CE and
    with a second teacher. Gradients are compared with the sort in sorted-L1 replaced by a smooth
    per-row term: the sort sends each element the sign of its rank's difference, and last-bit
    differences of the chunked head reorder near-equal probabilities among 32k-49k (3e-4 of the
    gradient's norm); the real loss's values are compared either way."""
    if smooth:
        monkeypatch.setattr(ct, "sorted_l1", lambda ps, pt, top_k=None: (ps[:, :1000] - pt[:, :1000]).pow(2).sum(-1))
    from compress.methods.distill import Distill
    from compress.recipe import load_recipe
    from compress.stages import RunContext
    from compress.teacher import Teacher
    from tests.tiny import write_recipe

    x = torch.tensor(student_tok(TEXT, add_special_tokens=False)["input_ids"][:120]).reshape(3, 40)
    batch = {"input_ids": x, "labels": torch.roll(x, -1, 1), "index": torch.arange(3), "step": 0, "micro": 0}
    runs = []
    for chunk in (None, 1, 7, 500):
        stage = {"kind": "distill", "ce_weight": ce, "cross_tokenizer": {"method": method}}
        recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path, tmp_path / "out", stages=[
            {**stage, **({"chunk_tokens": chunk} if chunk else {})}],
            student={"init": "drop_layers", "tokenizer": "mistral-7b-v0.1"}))
        ctx = RunContext(recipe=recipe, output_dir=tmp_path, tokenizer=student_tok, data=None, logger=None,
                         device=torch.device("cpu"), teacher=Teacher(llama(1, len(teacher_tok))),
                         extra_teachers=[(0.5, Teacher(llama(2, len(teacher_tok))))] if extra else [],
                         extra={"stage_seed": 7}, teacher_tokenizer=teacher_tok)
        m = Distill(recipe.stages[0], ctx)
        module = m.wrap(llama(0, len(student_tok)))
        loss, logs = m.loss(module, batch)
        grads = torch.autograd.grad(loss, [p for p in module.parameters() if p.requires_grad]) if smooth else ()
        runs.append((loss, grads, logs))
    (full, g_full, l_full), *chunked = runs
    for loss, grads, logs in chunked:
        torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, g_full):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # fp32 summation order
        assert logs.keys() == l_full.keys()
        for k in logs:
            torch.testing.assert_close(torch.as_tensor(logs[k]).float(), torch.as_tensor(l_full[k]).float(), rtol=1e-5, atol=1e-6)
    assert ("kd1" in l_full) == extra and ("ce" in l_full) == (ce > 0)


def test_on_policy_across_tokenizers_scores_the_students_own_text(tmp_path, student_tok, teacher_tok):
    """λ = 1, greedy: the loss is ULD on the student's own continuation, re-tokenized for the
    teacher, over the pairs that predict sampled text only; the data's continuation is never read."""
    from compress.methods.distill import Distill
    from compress.recipe import load_recipe
    from compress.sampling import sample_continuations
    from compress.stages import RunContext
    from compress.teacher import Teacher
    from tests.tiny import write_recipe

    P, T = 12, 30
    stage = {"kind": "distill", "cross_tokenizer": {"method": "uld"},
             "on_policy": {"lmbda": 1.0, "prompt_tokens": P, "temperature": 0.0}}
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path, tmp_path / "out", stages=[stage],
                                      student={"init": "drop_layers", "tokenizer": "mistral-7b-v0.1"}))
    teacher = llama(1, len(teacher_tok))
    ctx = RunContext(recipe=recipe, output_dir=tmp_path, tokenizer=student_tok, data=None, logger=None,
                     device=torch.device("cpu"), teacher=Teacher(teacher), extra_teachers=[],
                     extra={"stage_seed": 7}, teacher_tokenizer=teacher_tok)
    method = Distill(recipe.stages[0], ctx)
    module = method.wrap(llama(0, len(student_tok)))
    ids = student_tok(TEXT, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids[:T], ids[T:2 * T]])
    y = x.clone()
    y[:, P:] = torch.tensor(ids[2 * T:2 * T + T - P])  # the same prompts, another continuation

    def batch(ids):
        return {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "index": torch.arange(2), "step": 0, "micro": 0}

    loss, logs = method.loss(module, batch(x))
    assert logs["on_policy"] == 1 and torch.equal(loss, method.loss(module, batch(y))[0])
    with torch.no_grad():
        seq = sample_continuations(module.student, x[:, :P], T - P, temperature=0.0)
        al = align_batch(seq, student_tok, teacher_tok)
        al["pair_mask"] &= al["s_pos"] >= P - 1  # pairs predicting a sampled token
        zs, zt = aligned_logits(module.student(input_ids=seq).logits, teacher(input_ids=al["teacher_ids"]).logits, al)
        want = uld_loss(zs, zt)
    assert 0 < al["pair_mask"].sum() < al["pair_mask"].numel()
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
    for source in ("teacher", "interleaved"):
        with pytest.raises(CompressError, match="with cross_tokenizer use source: student"):
            load_recipe(write_recipe(tmp_path / "t.yaml", tmp_path, tmp_path / "out", stages=[
                {**stage, "on_policy": {"lmbda": 0.5, "source": source}}]))


def _offline_pair(tmp_path, student_tok, teacher_tok, stage, x, chunk=None):
    """A Distill method on a tiny teacher/student pair with the SmolLM2 and Mistral tokenizers, its
    offline cache (if any) built by ``prepare`` from data blocks ``x`` (student ids)."""
    from compress.data import TokenData
    from compress.methods.distill import Distill
    from compress.recipe import load_recipe
    from compress.stages import RunContext
    from compress.teacher import Teacher
    from tests.tiny import write_recipe

    tmp_path.mkdir(parents=True, exist_ok=True)
    blocks = torch.cat([x, x[:, :1]], 1).int()  # (n, T + 1), as TokenData holds them
    data = TokenData(train=blocks, val=blocks[:1], key="ct-test")
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path, tmp_path / "out",
                                      stages=[{**stage, **({"chunk_tokens": chunk} if chunk else {})}],
                                      student={"init": "drop_layers", "tokenizer": "mistral-7b-v0.1"}))
    ctx = RunContext(recipe=recipe, output_dir=tmp_path, tokenizer=student_tok, data=data, logger=None,
                     device=torch.device("cpu"), teacher=Teacher(llama(1, len(teacher_tok))),
                     extra={"stage_seed": 7}, teacher_tokenizer=teacher_tok)
    m = Distill(recipe.stages[0], ctx)
    module = m.wrap(llama(0, len(student_tok)))
    m.prepare(module, tmp_path / "stage", steps=4)
    return m, module, ctx


def test_offline_cache_across_tokenizers_holds_the_teachers_rows_at_the_student_positions(tmp_path, student_tok,
                                                                                            teacher_tok):
    """``offline`` with ``cross_tokenizer``: the cache is indexed by the student's data blocks, and
    each aligned student position holds the teacher's top-k at its byte-aligned teacher position."""
    import json

    from compress.losses import teacher_topk

    k = 16
    x = torch.tensor(student_tok(TEXT, add_special_tokens=False)["input_ids"][:120]).reshape(3, 40)
    stage = {"kind": "distill", "top_k": k, "temperature": 2.0, "offline": {"shard_blocks": 2},
             "cross_tokenizer": {"method": "uld"}}
    m, _, ctx = _offline_pair(tmp_path, student_tok, teacher_tok, stage, x)
    cache = m.teachers[0][2]
    meta = json.loads((tmp_path / "stage/teacher_topk/manifest.json").read_text())
    assert cache.positions == meta["positions"] == "student" and sorted(cache.where) == [0, 1, 2]
    ids, lp = cache.get(torch.tensor([2, 0, 1]), "cpu")
    assert ids.shape == lp.shape == (3, 40, k)
    al = align_batch(x[[2, 0, 1]], student_tok, teacher_tok)
    want_ids, want_lp = teacher_topk(ctx.teacher.logits(al["teacher_ids"]), k, 2.0)
    keep = al["pair_mask"]
    assert 0.5 < keep.float().mean() < 1  # real text, two tokenizers: most positions pair, not all
    b = torch.arange(3)[:, None].expand_as(keep)[keep]
    s, t = al["s_pos"][keep], al["t_pos"][keep]
    want_ids, order = want_ids[b, t].sort(-1)
    want_lp = want_lp[b, t].gather(-1, order)
    step = (want_lp.amax(-1) - want_lp.amin(-1)) / 255
    assert torch.equal(ids[b, s], want_ids)
    assert ((lp[b, s] - want_lp).abs() <= step[:, None] + 1e-5).all()
    assert meta["tokens"] == int(keep.sum()) and 0 < meta["recon_kl"] < 1e-3  # counted on the paired rows


def test_offline_uld_across_tokenizers_matches_the_online_loss(tmp_path, student_tok, teacher_tok):
    """The offline cross-tokenizer loss equals online ULD over the top k (the same pairs and rows),
    up to the codec's rounding; chunked equals unchunked; the teacher is not run in training."""
    k = 16
    x = torch.tensor(student_tok(TEXT, add_special_tokens=False)["input_ids"][:120]).reshape(3, 40)
    batch = {"input_ids": x[[1, 2]], "labels": torch.roll(x[[1, 2]], -1, 1), "index": torch.tensor([1, 2]),
             "step": 0, "micro": 0}
    xt = {"method": "uld"}
    online, om, _ = _offline_pair(tmp_path / "on", student_tok, teacher_tok,
                                  {"kind": "distill", "temperature": 2.0, "cross_tokenizer": {**xt, "top_k": k}}, x)
    want = online.loss(om, batch)[0]
    losses = []
    for chunk in (None, 7):
        m, module, ctx = _offline_pair(tmp_path / f"off{chunk}", student_tok, teacher_tok,
                                       {"kind": "distill", "temperature": 2.0, "top_k": k, "offline": {},
                                        "cross_tokenizer": xt}, x, chunk=chunk)
        ctx.teacher.module = None  # training reads the cache only
        losses.append(m.loss(module, batch)[0])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[0], want, rtol=2e-4, atol=0)  # measured 1.2e-5: 8-bit log-prob codes


@pytest.mark.parametrize("chunk", [None, 7])
def test_hidden_mse_across_tokenizers_compares_the_byte_aligned_positions(tmp_path, student_tok, teacher_tok, chunk):
    """``hidden_weight`` with ``cross_tokenizer``: the MSE between the student's hidden state at each
    aligned student position (through the learned projection: widths 24 vs 16 here) and the
    teacher's at the teacher position ending at the same byte, over the aligned pairs only; the
    chunked loss gives the same value and gradients."""
    from compress.methods.distill import Distill
    from compress.recipe import load_recipe
    from compress.stages import RunContext
    from compress.teacher import Teacher
    from tests.tiny import write_recipe

    x = torch.tensor(student_tok(TEXT, add_special_tokens=False)["input_ids"][:120]).reshape(3, 40)
    batch = {"input_ids": x, "labels": torch.roll(x, -1, 1), "index": torch.arange(3), "step": 0, "micro": 0}
    stage = {"kind": "distill", "kd_weight": 0.0, "hidden_weight": 1.0, "cross_tokenizer": {"method": "uld"},
             **({"chunk_tokens": chunk} if chunk else {})}
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path, tmp_path / "out", stages=[stage],
                                      student={"init": "drop_layers", "tokenizer": "mistral-7b-v0.1"}))
    teacher = llama(1, len(teacher_tok), 16)
    ctx = RunContext(recipe=recipe, output_dir=tmp_path, tokenizer=student_tok, data=None, logger=None,
                     device=torch.device("cpu"), teacher=Teacher(teacher), extra={"stage_seed": 7},
                     teacher_tokenizer=teacher_tok)
    m = Distill(recipe.stages[0], ctx)
    module = m.wrap(llama(0, len(student_tok), 24))
    loss, logs = m.loss(module, batch)
    al = align_batch(x, student_tok, teacher_tok)
    keep = al["pair_mask"]
    b = torch.arange(3)[:, None].expand_as(keep)[keep]
    hs = module.student(input_ids=x, output_hidden_states=True).hidden_states[-1][b, al["s_pos"][keep]]
    with torch.no_grad():
        ht = teacher(input_ids=al["teacher_ids"], output_hidden_states=True).hidden_states[-1][b, al["t_pos"][keep]]
    want = (module.projections[0](hs) - ht).pow(2).mean()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["hidden_mse"], want.detach(), rtol=1e-5, atol=1e-6)
    params = [p for p in module.parameters() if p.requires_grad]
    for got, ref in zip(torch.autograd.grad(loss, params, allow_unused=True),
                        torch.autograd.grad(want, params, allow_unused=True)):
        assert (got is None) == (ref is None)
        if got is not None:
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_a_draft_with_its_own_tokenizer_is_served_exactly_and_its_passes_counted(teacher_tok, student_tok):
    """transformers' universal assisted generation behind our serving loop: the output equals the
    target's greedy one, and target tokens per verification pass is k + 1 for a draft that is the
    target (same tokenizer given twice) and lower for an unrelated draft with the Mistral tokenizer."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from eval.speculative import serve_prompts_across_tokenizers

    def llama(seed, vocab):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                            initializer_range=0.2, bos_token_id=None, eos_token_id=None,
                                            pad_token_id=None)).eval()

    teacher = llama(0, len(teacher_tok))
    prompts = [torch.tensor([teacher_tok(t, add_special_tokens=False)["input_ids"]]) for t in (TEXT[:80], TEXT[200:300])]
    kw = dict(k=3, max_new_tokens=12)
    same = serve_prompts_across_tokenizers(teacher, copy.deepcopy(teacher), (teacher_tok, teacher_tok), prompts, **kw)
    other = serve_prompts_across_tokenizers(teacher, llama(1, len(student_tok)), (teacher_tok, student_tok), prompts, **kw)
    assert same["exact_match"] and other["exact_match"] and same["n_prompts"] == other["n_prompts"] == 2
    assert same["target_tokens_per_pass"] >= 3.0
    assert 1.0 <= other["target_tokens_per_pass"] < same["target_tokens_per_pass"]


@pytest.mark.parametrize("method", ["uld", pytest.param("gold", marks=pytest.mark.slow)])
def test_cross_tokenizer_run_trains_and_exports_the_students_tokenizer(tiny_teacher, tmp_path, method):
    """A real run: SmolLM2-tokenizer teacher, Mistral-tokenizer student; the loss falls, the export
    carries the student's tokenizer and loads with transformers alone."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tiny import launch, write_recipe

    out = tmp_path / method
    recipe = write_recipe(tmp_path / f"{method}.yaml", tiny_teacher, out, train={"max_steps": 8, "lr": 3e-3},
                          student={"init": "drop_layers", "keep_every": 2, "tokenizer": "mistral-7b-v0.1"},
                          stages=[{"kind": "distill", "ce_weight": 0.2, "cross_tokenizer": {"method": method}},
                                  {"kind": "eval", "tasks": ["pydocs_ppl_quick"], "limit": 2, "eval_blocks": 8,
                                   "gates": {"bpb_ratio_max": 100}, "speculative": {
                                       "ks": [2, 3], "prompts": 2, "prompt_tokens": 8, "max_new_tokens": 8}}])
    p = launch(recipe)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in rows if "kd" in r]
    assert len(kd) == 8 and kd[-1] < kd[0]
    assert all(0.3 < r["aligned_fraction"] <= 1 for r in rows if "aligned_fraction" in r)
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert len(tok) == 32000 and tok.convert_tokens_to_ids("▁the") == load_student_tokenizer("mistral-7b-v0.1").convert_tokens_to_ids("▁the")
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.vocab_size == 32000
    summary = json.loads((out / "summary.json").read_text())
    final = summary["metrics"]["final"]
    assert "student_ppl" in final and "kl" not in final  # token-by-token metrics need one vocabulary ...
    assert 0 < final["teacher_bpb"] < final["student_bpb"]  # ... bits per byte do not: the small student is worse
    assert final["bpb_ratio"] == pytest.approx(final["student_bpb"] / final["teacher_bpb"])
    ev = summary["eval"]  # the eval stage: each model runs lm-eval with its own tokenizer; no token-level check
    assert ev["passed"] and ev["gates"][0]["gate"] == "bpb_ratio <= max" and ev["gates"][0]["value"] > 1
    assert ev["student"]["bpb_ratio"] > 1 and "kl" not in ev["student"]
    assert [r["k"] for r in ev["speculative"]] == [2, 3]  # served across tokenizers, greedy-exact
    assert all(r["exact_match"] and r["n_prompts"] == 2 and r["target_tokens_per_pass"] >= 1 for r in ev["speculative"])
    for side in ("teacher", "student"):
        assert ev[side]["lm_eval"]["pydocs_ppl_quick"]["word_perplexity"] > 1  # per word: any tokenizer
    from launch.evaluate import main  # the export, evaluated on its own: the same bits-per-byte comparison

    base = ["--model", str(out / "final"), "--teacher", str(tiny_teacher), "--tasks", "", "--eval-blocks", "8",
            "--k", "2", "--prompts", "1", "--max-new-tokens", "6"]
    assert main([*base, "--out", str(tmp_path / "ev"), "--gate", "bpb_ratio_max=100"]) == 0
    res = json.loads((tmp_path / "ev/eval.json").read_text())
    assert res["student"]["bpb_ratio"] == pytest.approx(ev["student"]["bpb_ratio"], rel=1e-4)
    assert res["speculative"][0]["exact_match"] and "speculative_skipped" not in res
    assert main([*base, "--gate", "top1_min=0.5"]) == 2  # a token-level gate across tokenizers: refused


@pytest.mark.slow
def test_offline_cross_tokenizer_run_equals_the_online_one(tiny_teacher, tmp_path):
    """A real run whose teacher speaks SmolLM2 and student Mistral, with the teacher's top-k written
    to disk first: the same losses as online ULD over the top k, step for step."""
    import json

    from compress.tracking import read_metrics
    from tests.tiny import launch, write_recipe

    def run(name, stage):
        recipe = write_recipe(tmp_path / f"{name}.yaml", tiny_teacher, tmp_path / name, train={"max_steps": 4},
                              student={"init": "drop_layers", "keep_every": 2, "tokenizer": "mistral-7b-v0.1"},
                              stages=[{"kind": "distill", "temperature": 2.0, **stage}])
        p = launch(recipe)
        assert p.returncode == 0, p.stderr[-3000:]
        return [r["kd"] for r in read_metrics(tmp_path / name) if "kd" in r]

    online = run("online", {"cross_tokenizer": {"method": "uld", "top_k": 16}})
    offline = run("offline", {"top_k": 16, "offline": {"shard_blocks": 4}, "cross_tokenizer": {"method": "uld"}})
    assert len(offline) == 4
    torch.testing.assert_close(torch.tensor(offline), torch.tensor(online), rtol=2e-3, atol=1e-5)
    manifest = json.loads((tmp_path / "offline/stages/0-distill/teacher_topk/manifest.json").read_text())
    assert manifest["positions"] == "student" and 0 < manifest["recon_kl"] < 1e-3
