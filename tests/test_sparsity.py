"""2:4 / N:M / unstructured sparsity: masks, the compressed 2:4 layout, SparseGPT vs magnitude and
Wanda, and a real run (sparsify -> distill -> qat) whose mask holds through every optimizer step
(bf16 master weights, ZeRO-1), through SIGKILL + resume, and in both exports."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from compress.methods.sparsify import SparseLinear, SparsifyStage, sparsify
from compress.sparsity import nm_mask, pack_24, parse_pattern, row_mask, sparsegpt, unpack_24
from tests.tiny import kill_at_checkpoint, launch, launch_cmd, write_recipe


def groups_ok(w: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    return bool(((w.reshape(w.shape[0], -1, m) != 0).sum(-1) <= n).all())


def test_nm_and_row_masks_keep_the_highest_scores():
    torch.manual_seed(0)
    s = torch.rand(8, 32)
    mask = nm_mask(s, 2, 4)
    assert torch.equal(mask.reshape(8, 8, 4).sum(-1), torch.full((8, 8), 2.0))
    kept_min = torch.where(mask.bool(), s, torch.inf).reshape(8, 8, 4).amin(-1)
    dropped_max = torch.where(mask.bool(), -torch.inf, s).reshape(8, 8, 4).amax(-1)
    assert (kept_min > dropped_max).all()
    assert torch.equal(nm_mask(s, 4, 8).reshape(8, 4, 8).sum(-1), torch.full((8, 4), 4.0))
    r = row_mask(s, 0.75)
    assert torch.equal(r.sum(1), torch.full((8,), 8.0))


def test_pattern_parsing_names_the_fix():
    assert parse_pattern("2:4") == (2, 4) and parse_pattern("unstructured") is None
    with pytest.raises(Exception, match="N:M with 0 < N < M"):
        parse_pattern("4:2")


def test_compressed_24_layout_round_trips_including_groups_with_fewer_nonzeros():
    torch.manual_seed(1)
    w = torch.randn(6, 64) * nm_mask(torch.rand(6, 64), 2, 4)
    w[0, :8] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0])  # groups with 0 and 1 non-zeros
    values, meta = pack_24(w)
    assert values.shape == (6, 32) and meta.shape == (6, 8) and meta.dtype == torch.uint8
    assert torch.equal(unpack_24(values, meta), w)
    assert meta[0, 0] == (0 | 1 << 2) | ((0 | 1 << 2) << 4)  # group 0: 0,1 (both free); group 1: its 1, then free 0
    with pytest.raises(Exception, match="more than 2 non-zeros"):
        pack_24(torch.ones(2, 8))


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "unstructured"])
def test_sparsegpt_beats_magnitude_and_wanda_on_a_layers_output_error(pattern):
    torch.manual_seed(0)
    mix = torch.randn(128, 128) / 128 ** 0.5 + torch.eye(128)
    x = torch.randn(4096, 128) @ mix * torch.exp(torch.randn(128))  # correlated inputs, columns of uneven size
    w = torch.randn(64, 128) * 0.05
    H = 2 * x.t() @ x / len(x)
    p = parse_pattern(pattern)
    err = lambda v: float((x @ (v - w).t()).pow(2).mean())  # noqa: E731
    pick = (lambda s: nm_mask(s, *p)) if p else (lambda s: row_mask(s, 0.5))
    magnitude = err(w * pick(w.abs()))
    wanda = err(w * pick(w.abs() * x.norm(dim=0)))
    pruned, mask, _ = sparsegpt(w, H, p, 0.5)
    assert torch.equal(pruned * mask, pruned) and abs(float(mask.mean()) - 0.5) < 1e-6
    if p:
        assert groups_ok(pruned, *p)
    # Wanda's input norms beat magnitude; SparseGPT's error compensation beats Wanda
    assert err(pruned) < 0.9 * wanda and wanda < 0.5 * magnitude, (err(pruned), wanda, magnitude)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: SparseGPT on a model that lives there")
def test_sparsegpt_of_a_cuda_weight_equals_the_cpu_one():
    torch.manual_seed(0)
    x = torch.randn(2048, 128) * torch.exp(torch.randn(128))
    w, H = torch.randn(64, 128) * 0.05, 2 * x.t() @ x / len(x)
    cpu, gpu = sparsegpt(w, H, (2, 4), 0.5), sparsegpt(w.cuda(), H.cuda(), (2, 4), 0.5)
    assert gpu[0].is_cuda and groups_ok(gpu[0].cpu(), 2, 4)
    # the same choices, but for near-ties the devices' float error may flip; the same loss
    assert (gpu[1].cpu() == cpu[1]).float().mean() > 0.99 and abs(gpu[2] - cpu[2]) <= 0.01 * cpu[2]


def tiny():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()


def test_sparsify_on_a_model_sequential_sparsegpt_beats_magnitude():
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    blocks = torch.randint(0, 300, (16, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tiny()(input_ids=ids).logits
        errors = {}
        for method in ("magnitude", "wanda", "sparsegpt"):
            model = tiny()
            info = sparsify(model, SparsifyStage(method=method), blocks, log=lambda *_: None)
            assert info["modules"] == 14 and type(model.lm_head) is torch.nn.Linear
            for m in model.modules():
                if isinstance(m, SparseLinear):
                    assert groups_ok(m.weight) and torch.equal(m.weight * m.mask, m.weight)
            errors[method] = float((model(input_ids=ids).logits - want).pow(2).mean())
    assert errors["sparsegpt"] < errors["magnitude"], errors


def test_blockwise_after_sparsegpt_brings_the_model_closer_and_keeps_the_masks():
    from compress.blockwise import blockwise_model, snapshot_layers

    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    blocks = torch.randint(0, 300, (32, 32), generator=torch.Generator().manual_seed(0))
    model = tiny()
    originals = snapshot_layers(model)
    with torch.no_grad():
        want = tiny()(input_ids=ids).logits
        sparsify(model, SparsifyStage(method="sparsegpt"), blocks, log=lambda *_: None)
        before = float((model(input_ids=ids).logits - want).pow(2).mean())
    masks = {n: m.mask.clone() for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    blockwise_model(model, blocks, originals, epochs=4, lr=3e-4, log=lambda *_: None)
    with torch.no_grad():
        after = float((model(input_ids=ids).logits - want).pow(2).mean())
    assert after < 0.8 * before, (after, before)
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear):
            assert torch.equal(m.mask, masks[name]) and groups_ok(m.weight) and torch.equal(m.weight * m.mask, m.weight)


def sparse_recipe(path, teacher, out, **train):
    return write_recipe(path, teacher, out, student={"init": "teacher"},
                        train={"max_steps": 8, "save_every": 2, "zero_stage": 1, "precision": "bf16", "lr": 1e-2,
                               **train},
                        stages=[{"kind": "sparsify", "method": "sparsegpt", "calibration_blocks": 8,
                                 "blockwise": {"calibration_blocks": 8}},
                                {"kind": "distill"}, {"kind": "qat", "weights": {"bits": 4, "group_size": 32},
                                                      "max_steps": 3}])


def masks_of(state: dict) -> dict:
    return {k[: -len(".mask")]: v for k, v in state.items() if k.endswith(".mask")}


@pytest.fixture(scope="module")
def sparse_run(tiny_teacher, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sparse")
    recipe = sparse_recipe(tmp / "r.yaml", tiny_teacher, tmp / "out")
    p = launch(recipe, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return tmp / "out"


@pytest.mark.slow
def test_mask_holds_through_training_quantization_and_both_exports(sparse_run):
    out = sparse_run
    transformed = load_file(out / "stages/0-sparsify/model/model.safetensors")
    masks = masks_of(transformed)
    assert len(masks) == 4 * 7  # every projection of the 4 layers
    for stage in ("1-distill", "2-qat"):
        state = load_file(out / f"stages/{stage}/model/model.safetensors")
        for name, mask in masks.items():
            assert torch.equal(state[f"{name}.mask"], mask), f"{stage}: the mask changed"
            w = state[f"{name}.weight"].float()
            assert w[mask == 0].abs().max() == 0 and groups_ok(w), f"{stage}: {name} lost its 2:4 pattern"
        if stage == "1-distill":
            moved = state["model.layers.0.mlp.up_proj.weight"] != transformed["model.layers.0.mlp.up_proj.weight"]
            assert moved.any(), "distill trained nothing"
    info = json.loads((out / "stages/0-sparsify/transform.json").read_text())
    assert info["density"] == 0.5 and info["method"] == "sparsegpt"
    assert info["blockwise_error_after"] < info["blockwise_error_before"]  # block-wise reconstruction ran, masks held:
    assert all(transformed[f"{n}.weight"].float()[m == 0].abs().max() == 0 for n, m in masks.items())

    final = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)  # compressed-tensors int4
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        final(input_ids=ids)  # the library decompresses on the first forward
    packed = load_file(out / "final/sparse24.safetensors")
    from compress.quant import unpack_int32

    for name in masks:
        w = final.get_submodule(name).weight.float()
        assert groups_ok(w) and w[masks[name] == 0].abs().max() == 0
        out_f, in_f = packed[f"{name}.shape"].tolist()
        codes = unpack_int32(packed[f"{name}.codes"], 4, in_f // 2)
        q = unpack_24(codes.float(), packed[f"{name}.meta"])
        scale = packed[f"{name}.weight_scale"].float().repeat_interleave(32, 1)
        assert torch.equal(q * scale, w), f"{name}: the compressed 2:4 file disagrees with the export"


@pytest.mark.slow
def test_sigkill_mid_finetune_then_resume_keeps_the_mask(sparse_run, tiny_teacher, tmp_path):
    out = tmp_path / "killed"
    recipe = sparse_recipe(tmp_path / "r.yaml", tiny_teacher, out, max_steps=24)  # a wide window to kill in
    killed_at = kill_at_checkpoint(launch_cmd(recipe), out / "stages/1-distill/checkpoints", 4)
    assert killed_at and killed_at < 24
    p = launch(recipe, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"resumed stage 1 (distill) from step {killed_at}" in p.stdout
    masks = masks_of(load_file(out / "stages/0-sparsify/model/model.safetensors"))
    state = load_file(out / "stages/1-distill/model/model.safetensors")
    for name, mask in masks.items():
        assert state[f"{name}.weight"].float()[mask == 0].abs().max() == 0


@pytest.mark.parametrize("stages,message", [
    ([{"kind": "sparsify", "pattern": "3:7"}], "3:7 needs input widths divisible by 7"),
    ([{"kind": "sparsify", "targets": ["qkv_proj"]}], "match no linear"),
    ([{"kind": "sparsify", "pattern": "2:4", "sparsity": 0.7}], "`sparsity` applies to pattern: unstructured"),
    ([{"kind": "sparsify", "pattern": "4:2"}], "N:M with 0 < N < M"),
    ([{"kind": "quantize"}, {"kind": "sparsify"}], "a sparsify stage after a quantize stage is not supported"),
])
def test_bad_sparsity_input_fails_in_one_line_before_anything_is_written(tiny_teacher, tmp_path, stages, message):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, tmp_path / "out", student={"init": "teacher"},
                          stages=stages)
    p = launch(recipe)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "out").exists()
