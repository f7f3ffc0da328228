"""GQA conversion: merges that are exact on identical heads and optimal for what they claim, and a
real run (gqa -> distill) whose export is a stock HF model with fewer KV heads."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from compress.kv_heads import (merge_k_weighted, merge_mean, merge_state, merge_state_pca, merge_v_weighted,
                               pca_key_codes, rope_pair_scale)
from compress.methods.gqa import kv_statistics, query_energy, sequential_pca_state
from tests.tiny import launch, write_recipe


def tiny(kv=4):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=kv, tie_word_embeddings=True)).eval()


def converted(model, kv_new, method, ids=None):
    """``model`` with its KV heads merged to ``kv_new`` by ``method`` (statistics read on ``ids``)."""
    from compress.pruning import pruned_config

    cfg = pruned_config(model.config, {"num_key_value_heads": kv_new})
    small = LlamaForCausalLM(cfg).eval()
    if method == "pca":
        state = merge_state_pca(model.state_dict(), model.config, kv_new, kv_statistics(model, ids, kv_new=kv_new))
    elif method == "pca_sequential":
        before = {k: v.clone() for k, v in model.state_dict().items()}
        state = {**model.state_dict(), **sequential_pca_state(model, ids, 2, kv_new)}
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the model was left changed"
    else:
        energy = query_energy(model, ids) if method == "weighted" else None
        state = merge_state(model.state_dict(), model.config, kv_new, method, energy)
    small.load_state_dict(state, strict=False)
    return small


@pytest.mark.parametrize("method", ["mean", "weighted", "pca", "pca_sequential"])
def test_identical_heads_in_a_group_convert_exactly(method):
    model = tiny(kv=4)
    with torch.no_grad():
        for layer in model.model.layers:  # heads (0, 1) and (2, 3) identical: a 4 -> 2 merge loses nothing
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                w = proj.weight.view(4, 16, 64)
                w[1], w[3] = w[0], w[2]
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    small = converted(model, 2, method, ids)
    assert small.config.num_key_value_heads == 2 and small.model.layers[0].self_attn.k_proj.out_features == 32
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_weighted_merges_minimise_what_they_claim():
    torch.manual_seed(0)
    kv_old, d, hidden, heads = 4, 8, 16, 8
    wk, wv = torch.randn(kv_old * d, hidden), torch.randn(kv_old * d, hidden)
    energy = torch.rand(kv_old, d // 2) * 10
    wo = torch.randn(hidden, heads * d)

    def k_loss(m):  # sum_h sum_p c_h[p] ||k_h[p rows] - k'[p rows]||^2 per merged group
        c = torch.cat([energy, energy], 1)
        h = wk.reshape(kv_old, d, hidden)
        mm = m.reshape(2, d, hidden).repeat_interleave(2, 0)
        return float((c[..., None] * (h - mm) ** 2).sum())

    def v_loss(m):  # sum over query heads i of ||W_o,i (v_h(i) - v')||^2
        h = wv.reshape(kv_old, d, hidden)
        mm = m.reshape(2, d, hidden).repeat_interleave(2, 0)
        o = wo.reshape(hidden, heads, d).permute(1, 0, 2)
        diff = (h - mm).repeat_interleave(heads // kv_old, 0)
        return float(torch.einsum("ihd,idx->ihx", o, diff).pow(2).sum())

    mean_k, mean_v = merge_mean(wk, kv_old, 2), merge_mean(wv, kv_old, 2)
    best_k, best_v = merge_k_weighted(wk, energy, kv_old, 2), merge_v_weighted(wv, wo, heads, kv_old, 2)
    assert k_loss(best_k) < k_loss(mean_k) and v_loss(best_v) < v_loss(mean_v)
    for eps in (1e-2, -1e-2):  # a stationary point: nudging it makes it worse
        assert k_loss(best_k) <= k_loss(best_k + eps) and v_loss(best_v) <= v_loss(best_v + eps)



def related_heads_model():
    """Heads (0, 1) and (2, 3) that differ but carry the same information: each key RoPE pair of head 1 is
    head 0's times a complex factor (RoPE commutes with it), each value of head 1 a linear map of head 0's."""
    model = tiny(kv=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            k, v = layer.self_attn.k_proj.weight.view(4, 16, 64), layer.self_attn.v_proj.weight.view(4, 16, 64)
            c = torch.complex(torch.randn(8, generator=g), torch.randn(8, generator=g)).to(torch.complex128)
            k[1], k[3] = rope_pair_scale(k[0], c).float(), rope_pair_scale(k[2], c.conj()).float()
            a = torch.randn(16, 16, generator=g)
            v[1], v[3] = a @ v[0], a.T @ v[2]
    return model


def test_pca_merge_is_exact_on_heads_related_by_rope_commuting_maps_and_the_others_are_not():
    model = related_heads_model()
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        err = {m: (converted(model, 2, m, ids)(input_ids=ids).logits - want).abs().max().item()
               for m in ("mean", "weighted", "pca", "pca_sequential")}
    # exact only if the pairs are RoPE's (j, j + d/2), the query takes conj(c) and o_proj reads v back
    assert err["pca"] < 1e-5 and err["pca_sequential"] < 1e-5, err
    assert err["mean"] > 1e-2 and err["weighted"] > 1e-2, err


def test_pca_key_codes_minimise_the_weighted_key_error_per_rope_pair():
    g = torch.Generator().manual_seed(0)
    kv_old, half, n = 4, 6, 500
    z = torch.complex(torch.randn(n, kv_old, half, generator=g), torch.randn(n, kv_old, half, generator=g))
    z = z.to(torch.complex128)
    z = torch.einsum("nhj,gh->ngj", z, torch.randn(kv_old, kv_old, generator=g).to(z.dtype))  # correlated heads
    energy = torch.rand(kv_old, half, generator=g).double() * 5
    kcov = torch.einsum("nhj,ngj->jhg", z, z.conj()) / n
    enc, dec = pca_key_codes(energy, kcov, 2)

    def loss(enc, dec):  # sum over heads h and pairs j of energy * E|z_h - dec_h sum_(h' in group) enc_h' z_h'|^2
        merged = (enc * z).reshape(n, 2, 2, half).sum(2)  # groups of 2 consecutive old heads
        recon = dec * merged.repeat_interleave(2, 1)
        return float((energy * (z - recon).abs().pow(2).mean(0)).sum())

    base = loss(enc, dec)
    avg = torch.full_like(enc, 0.5)  # the mean merge read back as is
    assert base < 0.8 * loss(avg, torch.ones_like(dec))
    for eps in (1e-2, -1e-2, 1e-2j):  # a stationary point of the joint problem
        bump = torch.zeros_like(enc)
        bump[1, 2] = eps
        assert base <= loss(enc + bump, dec) and base <= loss(enc, dec + bump)


def test_pca_beats_the_other_merges_on_a_random_model():
    model = tiny(kv=4)
    calib = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    held = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=held).logits.log_softmax(-1)
        kl = {m: torch.nn.functional.kl_div(converted(model, 2, m, calib)(input_ids=held).logits.log_softmax(-1),
                                            want, log_target=True, reduction="batchmean").item()
              for m in ("mean", "weighted", "pca")}
    assert kl["pca"] < kl["weighted"] and kl["pca"] < kl["mean"], kl


def test_sequential_pca_merges_each_layer_on_the_inputs_the_merged_layers_before_it_give():
    import copy

    model = tiny(kv=4)
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    seq = sequential_pca_state(model, ids, 2, 2)
    one_pass = merge_state_pca(model.state_dict(), model.config, 2, kv_statistics(model, ids, kv_new=2))
    key = "model.layers.{}.self_attn.k_proj.weight"
    torch.testing.assert_close(seq[key.format(0)], one_pass[key.format(0)])  # layer 0 sees the same inputs
    assert not torch.allclose(seq[key.format(1)], one_pass[key.format(1)], atol=1e-4)
    hybrid = copy.deepcopy(model)  # layer 0 replaced by its merge, each old KV head holding its group's head
    with torch.no_grad():
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w = seq[f"model.layers.0.self_attn.{n}.weight"]
            if n in ("k_proj", "v_proj"):
                w = w.reshape(2, 16, 64).repeat_interleave(2, 0).reshape(64, 64)
            getattr(hybrid.model.layers[0].self_attn, n).weight.copy_(w)
    by_hand = merge_state_pca(hybrid.state_dict(), model.config, 2, kv_statistics(hybrid, ids, kv_new=2))
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        name = f"model.layers.1.self_attn.{n}.weight"
        torch.testing.assert_close(seq[name], by_hand[name])


def test_blockwise_after_a_merge_brings_the_model_closer_on_unseen_text():
    from compress.blockwise import blockwise_model, snapshot_layers

    model = tiny(kv=4)
    calib = torch.randint(0, 300, (16, 32), generator=torch.Generator().manual_seed(0))
    held = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    originals = snapshot_layers(model)  # the targets, with 4 KV heads

    def kl(m):
        with torch.no_grad():
            want = model(input_ids=held).logits.log_softmax(-1)
            return torch.nn.functional.kl_div(m(input_ids=held).logits.log_softmax(-1), want, log_target=True,
                                              reduction="batchmean").item()

    for method in ("pca", "mean"):
        small = converted(model, 2, method, calib)
        before = kl(small)
        errors = blockwise_model(small, calib, originals, epochs=4, lr=1e-3, batch_size=4, log=lambda *_: None)
        assert small.config.num_key_value_heads == 2 and small.model.layers[0].self_attn.k_proj.out_features == 32
        assert all(after < first for first, after in errors.values()), (method, errors)
        assert kl(small) < 0.8 * before, (method, kl(small), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the merges on a model that lives there")
def test_merges_of_a_model_on_the_gpu_equal_those_on_the_cpu():
    model = tiny(kv=4)
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    cpu = {**model.state_dict(), **sequential_pca_state(model, ids, 2, 2)}
    weighted = merge_state(model.state_dict(), model.config, 2, "weighted", query_energy(model, ids))
    model.cuda()
    gpu = {**model.state_dict(), **sequential_pca_state(model, ids.cuda(), 2, 2)}
    gpu_weighted = merge_state(model.state_dict(), model.config, 2, "weighted", query_energy(model, ids.cuda()))
    for want, got in ((cpu, gpu), (weighted, gpu_weighted)):
        for k, t in want.items():
            assert got[k].is_cuda, k
            torch.testing.assert_close(got[k].cpu(), t, rtol=1e-3, atol=1e-4)


def test_pca_refuses_models_it_cannot_fold_into():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from compress.errors import CompressError
    from compress.methods.gqa import check_pca_mergeable

    partial = tiny().config
    partial.rope_parameters = {**partial.rope_parameters, "partial_rotary_factor": 0.5}  # where transformers 5 keeps it
    with pytest.raises(CompressError, match=r"partial_rotary_factor 0.5\); use merge: weighted"):
        check_pca_mergeable(partial)
    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    with pytest.raises(CompressError, match="per-head q/k norm"):
        check_pca_mergeable(qwen3.config, qwen3)
    check_pca_mergeable(tiny().config, tiny())  # a Llama: fine


@pytest.mark.slow
def test_gqa_then_distill_exports_a_stock_model_with_fewer_kv_heads(tiny_teacher, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, tmp_path / "out", student={"init": "teacher"},
                          stages=[{"kind": "gqa", "num_key_value_heads": 1, "calibration_blocks": 4,
                                   "blockwise": {"calibration_blocks": 4, "lr": 1e-3}},
                                  {"kind": "distill", "max_steps": 3}])
    p = launch(recipe)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "out"
    info = json.loads((out / "stages/0-gqa/transform.json").read_text())
    assert info["kv_heads"] == [2, 1] and info["kv_bytes_per_token_bf16"][0] == 2 * info["kv_bytes_per_token_bf16"][1]
    assert info["blockwise_tokens"] > 0 and info["blockwise_error_after"] < info["blockwise_error_before"]
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert final.config.num_key_value_heads == 1 and final.model.layers[0].self_attn.v_proj.out_features == 16
    assert "modules.json" not in {f.name for f in (out / "final").iterdir()}
    # generate() reads generation_config: built by from_config during training, it said use_cache False,
    # and the export decoded every token over the whole context (16x slower at 1,024 tokens)
    assert final.generation_config.use_cache is True
    summary = json.loads((out / "summary.json").read_text())
    after = next(r for r in summary["table"] if r["model"].startswith("after 0-gqa"))
    assert summary["metrics"]["final"]["kl"] < after["kl"]  # uptraining recovered some of the merge's loss


@pytest.mark.parametrize("stages,message", [
    ([{"kind": "gqa", "num_key_value_heads": 3}], "num_key_value_heads 3 must divide the model's 2 KV heads"),
    ([{"kind": "gqa", "num_key_value_heads": 2}], "is what the model has already"),
    ([{"kind": "quantize"}, {"kind": "gqa", "num_key_value_heads": 1}], "a gqa stage after a quantize stage"),
])
def test_bad_gqa_input_fails_in_one_line_before_any_weights_load(tiny_teacher, tmp_path, stages, message):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, tmp_path / "out", student={"init": "teacher"},
                          stages=stages)
    p = launch(recipe, "--dry-run")
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
