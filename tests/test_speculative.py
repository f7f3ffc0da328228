"""Speculative decoding on tiny random Llamas (CPU).

Invariants: greedy speculative output == the target's own greedy output, whatever the draft;
sampled speculative output is distributed as the target (chi-square against exact softmax).
"""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from compress.errors import CompressError
from eval.speculative import (
    SpecResult,
    assisted_generate_hf,
    greedy_generate,
    serve_prompts,
    speculative_generate,
)

V = 64
CHI2_999_DF7 = 24.322  # 0.999 quantile of chi-square with 7 degrees of freedom (vocab of 8, minus 1)


def tiny_llama(seed, vocab=V, hidden=32, layers=2, init=0.02):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, initializer_range=init,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)  # no implicit eos in generate()
    return LlamaForCausalLM(config).eval()


def perturbed(model, scale, seed):
    """A copy with Gaussian noise on every weight: agrees with the model often, not always."""
    noisy = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    return noisy


def padded(model, extra):
    """The same model with `extra` vocab padding rows whose logits dwarf every real token's."""
    config = copy.deepcopy(model.config)
    config.vocab_size += extra
    big = LlamaForCausalLM(config).eval()
    state = model.state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = torch.cat([state[name], torch.full((extra, config.hidden_size), 5.0)])
    big.load_state_dict(state)
    return big


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models: handing each 32-wide matmul to a thread pool costs more than the matmul, and
    # on a busy machine it made the 3000-sample test 5-10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target():
    return tiny_llama(0)


@pytest.fixture(scope="module")
def drafts(target):
    return {
        "random": tiny_llama(1),
        "smaller": tiny_llama(2, hidden=16, layers=1),
        "perturbed": perturbed(target, scale=0.1, seed=3),
    }


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(42)
    return [torch.randint(0, V, (1, T), generator=gen) for T in (1, 5, 11)]


@pytest.mark.parametrize("same_object", [True, False])
@pytest.mark.parametrize("k", [1, 4])
def test_identical_draft_accepts_everything(target, prompts, same_object, k):
    draft = target if same_object else copy.deepcopy(target)
    for ids in prompts:
        res = speculative_generate(target, draft, ids, max_new_tokens=17, k=k)
        assert res.acceptance_rate == 1.0
        assert torch.equal(res.tokens, greedy_generate(target, ids, 17))
        # Every round keeps k drafts plus the bonus token (the last round is cut to fit 17).
        assert res.target_passes == -(-17 // (k + 1))


def test_greedy_generate_matches_hf(target, prompts):
    for ids in prompts:
        hf = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20)
        assert torch.equal(greedy_generate(target, ids, 20), hf[0, ids.shape[1]:])


@pytest.mark.parametrize("k", [1, 2, 4, 6])
@pytest.mark.parametrize("kind", ["random", "smaller", "perturbed"])
def test_greedy_equals_target_greedy(target, drafts, prompts, kind, k):
    for ids in prompts:
        res = speculative_generate(target, drafts[kind], ids, max_new_tokens=20, k=k)
        hf = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20)
        assert torch.equal(res.tokens, hf[0, ids.shape[1]:])
        assert torch.equal(res.tokens, greedy_generate(target, ids, 20))
        assert 0 <= res.accepted <= res.proposed
        assert res.draft_passes >= res.proposed


def test_perturbed_draft_accepts_some_but_not_all(target, drafts, prompts):
    # Guards the test above: the perturbed draft exercises both acceptance and rejection.
    res = [speculative_generate(target, drafts["perturbed"], ids, max_new_tokens=20, k=4) for ids in prompts]
    rate = sum(r.accepted for r in res) / sum(r.proposed for r in res)
    assert 0.2 < rate < 0.95


def test_vocab_padding(target, prompts):
    # Padding rows carry the largest logits: only the shared ids [:V] keep them out of the drafts.
    same_weights = padded(target, extra=8)
    other = tiny_llama(5, vocab=V + 8)
    for ids in prompts:
        reference = greedy_generate(target, ids, 15)
        res = speculative_generate(target, same_weights, ids, max_new_tokens=15, k=3)
        assert torch.equal(res.tokens, reference)
        assert res.acceptance_rate == 1.0
        assert torch.equal(speculative_generate(target, other, ids, max_new_tokens=15, k=3).tokens, reference)


def _chi2(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampling_preserves_target_distribution():
    # Vocab 8 with peaked logits (init 0.2): every cell expects > 50 of the 3000 samples.
    temperature, n_samples = 0.8, 3000
    target = tiny_llama(0, vocab=8, init=0.2)
    draft = tiny_llama(1, vocab=8, init=0.2)
    prompt = torch.tensor([[3, 1, 4, 1]])

    def exact_marginals(model):
        """Distribution of the first and second sampled token, computed from full forwards."""
        with torch.inference_mode():
            first = torch.softmax(model(prompt).logits[0, -1] / temperature, -1)  # (8,)
            extended = torch.cat([prompt.repeat(8, 1), torch.arange(8)[:, None]], dim=1)  # (8, 5)
            second_given_first = torch.softmax(model(extended).logits[:, -1] / temperature, -1)  # (8, 8)
        return first.double(), (first[:, None] * second_given_first).sum(0).double()

    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(2, 8, dtype=torch.float64)
    for _ in range(n_samples):
        # k=2 and 3 new tokens: the second token is a verified draft, a residual or a target sample.
        res = speculative_generate(target, draft, prompt, max_new_tokens=3, k=2, temperature=temperature,
                                   generator=gen)
        assert res.tokens.numel() == 3
        counts[0, res.tokens[0]] += 1
        counts[1, res.tokens[1]] += 1

    p_first, p_second = exact_marginals(target)
    q_first, q_second = exact_marginals(draft)
    assert min(p_first.min(), p_second.min()) * n_samples > 5  # chi-square needs populated cells
    assert _chi2(counts[0], p_first) < CHI2_999_DF7
    assert _chi2(counts[1], p_second) < CHI2_999_DF7
    # Power: the same samples are clearly NOT distributed as the draft.
    assert _chi2(counts[0], q_first) > CHI2_999_DF7
    assert _chi2(counts[1], q_second) > CHI2_999_DF7


def test_sampling_is_reproducible(target, drafts, prompts):
    runs = [speculative_generate(target, drafts["perturbed"], prompts[1], max_new_tokens=12, k=3,
                                 temperature=1.0, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)


def test_eos_stops_generation(target, drafts, prompts):
    ids = prompts[1]
    reference = greedy_generate(target, ids, 20)
    eos = int(reference[6])
    stop = int((reference == eos).nonzero()[0]) + 1  # first occurrence, eos included
    assert torch.equal(greedy_generate(target, ids, 20, eos_token_id=eos), reference[:stop])
    for draft in (target, drafts["perturbed"], drafts["random"]):
        res = speculative_generate(target, draft, ids, max_new_tokens=20, k=4, eos_token_id=eos)
        assert torch.equal(res.tokens, reference[:stop])
    sampled = speculative_generate(target, drafts["perturbed"], ids, max_new_tokens=30, k=4, temperature=1.0,
                                   generator=torch.Generator().manual_seed(0), eos_token_id=eos)
    assert (sampled.tokens == eos).sum() <= 1
    assert sampled.tokens.numel() == 30 or sampled.tokens[-1] == eos


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_max_new_tokens_exact(target, drafts, prompts, temperature):
    for n in range(1, 12):
        for draft in (target, drafts["perturbed"]):
            res = speculative_generate(target, draft, prompts[0], max_new_tokens=n, k=4, temperature=temperature,
                                       generator=torch.Generator().manual_seed(n))
            assert res.tokens.numel() == n
            assert res.tokens.dtype == torch.long and res.tokens.dim() == 1


@pytest.mark.parametrize("kind", ["random", "perturbed"])
def test_assisted_generate_hf_matches(target, drafts, prompts, kind):
    draft = drafts[kind]
    saved = draft.generation_config.to_dict()
    for ids in prompts:
        ours = speculative_generate(target, draft, ids, max_new_tokens=20, k=3)
        assert torch.equal(assisted_generate_hf(target, draft, ids, 20, k=3), ours.tokens)
    assert draft.generation_config.to_dict() == saved  # the pinned options were put back


def test_serve_prompts(target, drafts, prompts):
    stats = serve_prompts(target, drafts["perturbed"], prompts, k=4, max_new_tokens=16)
    assert stats["exact_match"] is True
    assert stats["k"] == 4 and stats["n_prompts"] == len(prompts)
    assert stats["new_tokens"] == 16 * len(prompts)
    assert 0 <= stats["acceptance_rate"] <= 1
    assert 0 <= stats["mean_accepted_per_pass"] <= 4
    per_prompt = stats["per_prompt"]  # [accepted, proposed] of each prompt: they add up to the rate
    assert len(per_prompt) == len(prompts) and all(0 <= a <= p for a, p in per_prompt)
    assert sum(a for a, _ in per_prompt) / sum(p for _, p in per_prompt) == stats["acceptance_rate"]
    assert stats["target_tokens_per_s"] > 0 and stats["spec_tokens_per_s"] > 0 and stats["speedup"] > 0
    sampled = serve_prompts(target, drafts["perturbed"], [p[0] for p in prompts], k=2, max_new_tokens=8,
                            temperature=1.0)
    assert sampled["exact_match"] is None and sampled["new_tokens"] == 8 * len(prompts)


def test_spec_result_properties():
    res = SpecResult(tokens=torch.arange(6), target_passes=3, draft_passes=8, proposed=8, accepted=2)
    assert res.acceptance_rate == 0.25
    assert res.tokens_per_target_pass == 2.0


def test_bad_inputs(target, drafts, prompts):
    ids = prompts[1]
    draft = drafts["random"]
    with pytest.raises(CompressError, match="k=0"):
        speculative_generate(target, draft, ids, max_new_tokens=4, k=0)
    with pytest.raises(CompressError, match="max_new_tokens=0"):
        speculative_generate(target, draft, ids, max_new_tokens=0)
    with pytest.raises(CompressError, match="temperature"):
        speculative_generate(target, draft, ids, max_new_tokens=4, temperature=-1.0)
    for bad in (ids[0], ids.repeat(2, 1), ids[:, :0], ids.float(), ids.tolist()):
        with pytest.raises(CompressError, match=r"shape \(1, T\)"):
            speculative_generate(target, draft, bad, max_new_tokens=4)
    with pytest.raises(CompressError, match="tokenizer"):
        speculative_generate(target, tiny_llama(6, vocab=V + 300), ids, max_new_tokens=4)
    with pytest.raises(CompressError, match="equal vocab sizes"):
        assisted_generate_hf(target, tiny_llama(7, vocab=V + 8), ids, 4)
    with pytest.raises(CompressError, match="max_new_tokens=0"):
        greedy_generate(target, ids, 0)
    with pytest.raises(CompressError, match="no prompts"):
        serve_prompts(target, draft, [], k=2, max_new_tokens=4)
    training = copy.deepcopy(draft).train()
    with pytest.raises(CompressError, match="training mode"):
        speculative_generate(target, training, ids, max_new_tokens=4)


def test_exactness_is_judged_in_fp32_and_reported_in_bf16(target, drafts, prompts):
    from eval.runner import failures

    stats = serve_prompts(target, drafts["perturbed"], prompts[:2], k=3, max_new_tokens=8)
    assert stats["exact_match"] is True and stats["first_divergence"] is None and stats["dtype"] == "float32"
    half = serve_prompts(copy.deepcopy(target).to(torch.bfloat16), copy.deepcopy(drafts["perturbed"]).to(torch.bfloat16),
                         prompts[:2], k=3, max_new_tokens=8)
    assert half["dtype"] == "bfloat16"
    row = {"k": 3, "exact_match": False, "first_divergence": 5}
    assert failures({"gates": [], "speculative": [{**row, "dtype": "float32"}]}) == [
        "speculative k=3 output differs from the teacher's (first at token 5)"]
    assert failures({"gates": [], "speculative": [{**row, "dtype": "bfloat16"}]}) == []  # numerics, reported


def test_hopeless_draft_stops_early_and_the_rows_say_so(target, drafts, prompts, capsys):
    from eval.runner import speculative_report
    from eval.stage import SpeculativeCheck

    cfg = SpeculativeCheck(ks=[2, 3, 4], prompts=3, max_new_tokens=24, hopeless_acceptance=0.5, compare_hf=False)
    rows = speculative_report(target, drafts["random"], prompts, cfg)
    first, second, third = rows
    assert first["acceptance_rate"] < 0.5 and first["n_prompts"] == 1 < len(prompts)
    assert first["stopped"].startswith("hopeless: acceptance") and "after 1 of 3 prompts" in first["stopped"]
    assert first["exact_match"] is True  # what did run is still checked
    assert second == {"k": 3, "n_prompts": 0, "stopped": "skipped (hopeless at k=2)"}
    assert third == {"k": 4, "n_prompts": 0, "stopped": "skipped (hopeless at k=2)"}
    assert "speculative decoding" in capsys.readouterr().err  # the progress bar
    # a good draft is not stopped by the same threshold
    good = speculative_report(target, target, prompts, cfg)
    assert [r["stopped"] for r in good] == [None] * 3 and all(r["n_prompts"] == 3 for r in good)


def test_time_budget_stops_after_the_current_prompt(target, drafts, prompts):
    import time as _time

    stats = serve_prompts(target, drafts["perturbed"], prompts, k=2, max_new_tokens=8, deadline=_time.monotonic())
    assert stats["n_prompts"] == 1 and stats["stopped"] == "time budget spent after 1 of 3 prompts"
    from eval.runner import speculative_report
    from eval.stage import SpeculativeCheck

    rows = speculative_report(target, drafts["perturbed"], prompts, SpeculativeCheck(
        ks=[2, 3], prompts=3, max_new_tokens=8, time_budget_s=1e-6, compare_hf=False))
    assert [r["n_prompts"] for r in rows] == [1, 0] and rows[1]["stopped"] == "skipped (time budget spent at k=2)"
    baseline: dict = {}
    full = serve_prompts(target, drafts["perturbed"], prompts, k=2, max_new_tokens=8, baseline=baseline)
    assert full["stopped"] is None and sorted(baseline) == [0, 1, 2]  # the greedy baseline, kept for the next k
    again = serve_prompts(target, drafts["perturbed"], prompts, k=3, max_new_tokens=8, baseline=baseline)
    assert again["target_tokens_per_s"] == full["target_tokens_per_s"]  # reused, not re-run


# Static caches (eval.decoders.GraphDecoder): the serving path. Off CUDA the same static-cache
# forwards run eagerly, so these check its positions, its 4-D mask and its roll-back; on CUDA the
# last test checks the captured graphs give the same tokens.

def test_static_cache_greedy_equals_dynamic(target, prompts):
    for ids in prompts:
        assert torch.equal(greedy_generate(target, ids, 20, graphs=True), greedy_generate(target, ids, 20))


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("kind", ["smaller", "perturbed"])
def test_static_cache_speculative_equals_greedy(target, drafts, prompts, kind, k):
    # The perturbed draft is rejected part of the time (test above), so the roll-back is exercised;
    # the decoders are reused from prompt to prompt (one static cache per model).
    for ids in prompts:
        res = speculative_generate(target, drafts[kind], ids, max_new_tokens=20, k=k, graphs=True)
        eager = speculative_generate(target, drafts[kind], ids, max_new_tokens=20, k=k)
        assert torch.equal(res.tokens, greedy_generate(target, ids, 20))
        assert (res.accepted, res.proposed, res.target_passes) == (eager.accepted, eager.proposed, eager.target_passes)


def test_static_cache_model_drafting_for_itself_gets_two_caches(target, prompts):
    for ids in prompts:
        res = speculative_generate(target, target, ids, max_new_tokens=17, k=4, graphs=True)
        assert res.acceptance_rate == 1.0 and torch.equal(res.tokens, greedy_generate(target, ids, 17))


def test_static_cache_decoder_reuse_and_bounds(target, prompts):
    from eval.decoders import GraphDecoder, decoder

    first = decoder(target, 40, graphs=True)
    assert decoder(target, 100, graphs=True) is first  # rounded up to 256 tokens: reused, emptied
    assert first.length == 0
    bigger = decoder(target, 300, graphs=True)
    assert bigger is not first and bigger.max_len == 512
    small = GraphDecoder(target, max_len=8)
    with torch.inference_mode():
        small.forward(prompts[2][0, :6], keep=1)
        with pytest.raises(CompressError, match="holds 8 tokens"):
            small.forward(prompts[2][0, :3], keep=1)
        small.crop(2)
        assert small.length == 2
        logits = small.forward(prompts[2][0, 2:8], keep=6)  # after a crop: the same as one prefill
        full = target(prompts[2][:, :8]).logits[0, 2:].float()
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)


def test_static_cache_refuses_sliding_window():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    model = MistralForCausalLM(config).eval()
    with pytest.raises(CompressError, match="full-attention models only"):
        greedy_generate(model, torch.zeros(1, 3, dtype=torch.long), 2, graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_give_the_eager_tokens(target, drafts, prompts):
    from eval.decoders import decoder

    gpu_target, gpu_draft = copy.deepcopy(target).cuda(), copy.deepcopy(drafts["perturbed"]).cuda()
    for ids in prompts:
        reference = greedy_generate(gpu_target, ids, 20)
        assert torch.equal(greedy_generate(gpu_target, ids, 20, graphs=True), reference)
        res = speculative_generate(gpu_target, gpu_draft, ids, max_new_tokens=20, k=4, graphs=True)
        assert torch.equal(res.tokens, reference)
    dec = decoder(gpu_target, 1, graphs=True)
    assert dec.graph_error is None and set(dec.graphs) >= {1}  # decode steps were captured, not eager


def test_static_cache_decoder_does_not_keep_its_model_alive():
    import gc
    import weakref

    from eval.decoders import graph_decoder

    model = tiny_llama(9)
    assert graph_decoder(model) is None
    greedy_generate(model, torch.zeros(1, 3, dtype=torch.long), 2, graphs=True)
    assert graph_decoder(model) is not None
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None  # a served model is freed with its decoder and graphs


def test_eval_speculative_check_serves_on_static_caches_when_asked(target, drafts, prompts):
    from eval.decoders import serves_graphs
    from eval.runner import speculative_report
    from eval.stage import SpeculativeCheck

    assert not serves_graphs(target)  # auto (graphs: null) is eager off CUDA
    auto = speculative_report(target, drafts["perturbed"], prompts, SpeculativeCheck(
        ks=[3], prompts=3, max_new_tokens=12, compare_hf=False))
    static = speculative_report(target, drafts["perturbed"], prompts, SpeculativeCheck(
        ks=[3], prompts=3, max_new_tokens=12, compare_hf=False, graphs=True))
    assert (auto[0]["graphs"], static[0]["graphs"]) == (False, True)
    assert static[0]["exact_match"] is True
    assert static[0]["acceptance_rate"] == auto[0]["acceptance_rate"]  # the same tokens, served another way


def test_a_transformers_without_the_cache_argument_is_refused(monkeypatch, target, prompts):
    """transformers before the rename (5.17: ``past_key_values``) would take ``cache=`` silently and
    decode every step without context; the decoders and the on-policy sampler refuse it."""
    import transformers

    from compress.sampling import check_cache_argument, sample_continuations

    def old_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        raise AssertionError("never called")

    check_cache_argument.cache_clear()
    monkeypatch.setattr(transformers.LlamaModel, "forward", old_forward)
    try:
        with pytest.raises(CompressError, match="past_key_values"):
            greedy_generate(target, prompts[0], 2)
        with pytest.raises(CompressError, match="past_key_values"):
            sample_continuations(target, prompts[1], 2)
    finally:
        check_cache_argument.cache_clear()
