"""Recipes: every shipped one validates; every bad one fails in one line, before any work."""

import subprocess
import sys

import pytest
import yaml

from compress.recipe import load_recipe
from launch.distill import main
from tests.tiny import REPO, run_env, write_recipe

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def test_recipes_found():
    assert RECIPES, "no recipe under recipes/"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_recipe_validates_and_fits(path, capsys):
    assert path.read_text().startswith("#"), "every recipe opens with a comment: what, how to run, what to expect"
    assert main(["--recipe", str(path), "--dry-run"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["stages"], resolved


def test_overrides_apply(tiny_teacher, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_teacher, tmp_path / "out")
    r = load_recipe(path, ["train.max_steps=3", f"output_dir={tmp_path}/other", "stages.0.loss=jsd"])
    assert r.train.max_steps == 3 and r.output_dir == f"{tmp_path}/other" and r.stages[0].loss == "jsd"


def _bad(tmp_path, tiny_teacher, **sections):
    return write_recipe(tmp_path / "bad.yaml", tiny_teacher, tmp_path / "out", **sections)


@pytest.fixture
def other_tokenizer_model(tmp_path):
    """A tiny model with a different (word-level) tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "hello", "world", "the", "a"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    out = tmp_path / "other"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


BAD = {
    "unknown key": (dict(train={"max_step": 3}), "unknown key `train.max_step`"),
    "unknown top-level": (dict(trian={}), "unknown key `trian`"),
    "wrong type": (dict(train={"lr": "fast"}), "`train.lr`"),
    "out of range": (dict(train={"zero_stage": 5}), "`train.zero_stage`"),
    "unknown stage": (dict(stages=[{"kind": "distil"}]), "unknown stage kind"),
    "unknown loss": (dict(stages=[{"kind": "distill", "loss": "kl"}]), "`stages.0.loss`"),
    "stage key typo": (dict(stages=[{"kind": "distill", "temprature": 2.0}]), "unknown key `stages.0.temprature`"),
    "offline without top_k": (dict(stages=[{"kind": "distill", "offline": {}}]), "set top_k"),
    "zero weights": (dict(stages=[{"kind": "distill", "kd_weight": 0}]), "loss weights are 0"),
    "missing teacher": (dict(teacher={"source": "/nonexistent/model"}), "not found"),
    "missing gguf": (dict(teacher={"source": "/nonexistent/m.gguf"}), "GGUF file"),
    "layer out of range": (dict(student={"init": "drop_layers", "keep_layers": [0, 9]}), "keep_layers"),
    "checkpoint without path": (dict(student={"init": "checkpoint"}), "student.path"),
    "bad student config": (dict(student={"init": "config", "config": {"num_layerz": 2}}), "student.config.num_layerz"),
    "heads do not divide": (dict(student={"init": "config", "config": {"num_attention_heads": 3}}), "num_key_value_heads"),
    "offline with zero3": (dict(teacher={"shard": "zero3"},
                                stages=[{"kind": "distill", "top_k": 8, "offline": {}}]), "shard=none"),
    "no data files": (dict(data={"source": "files", "files": ["/nonexistent/*.txt"]}), "matches no file"),
    "hidden layer beyond the student": (dict(stages=[{"kind": "distill", "hidden_weight": 1.0, "hidden_layers": [5]}]),
                                        "distill.hidden_layers has [5] but the student has 3 layers"),
    "missing plugin": (dict(plugins=["no_such_pkg.method"]), "plugin 'no_such_pkg.method' could not be imported"),
    "plugin kind unknown without it": (dict(stages=[{"kind": "toy_mask"}]), "unknown stage kind"),
    "bad eval task": (dict(stages=[{"kind": "eval", "tasks": ["no_such_task"]}]), "unknown lm-eval task"),
    "cloze task on too little held-out text": (dict(stages=[{"kind": "distill"}, {"kind": "eval", "tasks": [
        "pydocs_cloze_quick"]}]), "pydocs cloze task: 6 held-out documents give 160 items, 200 needed"),
    "token-level gate across tokenizers": (dict(student={"init": "drop_layers", "tokenizer": "mistral-7b-v0.1"},
                                                stages=[{"kind": "eval", "tasks": [], "gates": {"top1_min": 0.5}}]),
                                           "use gates.bpb_ratio_max"),
    "on-policy lambda out of range": (dict(stages=[{"kind": "distill", "on_policy": {"lmbda": 2}}]),
                                      "`stages.0.on_policy.lmbda`"),
    "on-policy prompt fills the block": (dict(stages=[{"kind": "distill", "on_policy": {"prompt_tokens": 32}}]),
                                         "leaves nothing to sample"),
    "chunked loss under ZeRO-3": (dict(train={"zero_stage": 3}, stages=[{"kind": "distill", "chunk_tokens": 64}]),
                                  "use train.zero_stage <= 2"),
    "offline GOLD across tokenizers": (dict(stages=[{"kind": "distill", "top_k": 8, "offline": {},
                                                     "cross_tokenizer": {"method": "gold"}}]), "use cross_tokenizer.method: uld"),
    "offline ULD with its own top_k": (dict(stages=[{"kind": "distill", "top_k": 8, "offline": {},
                                                     "cross_tokenizer": {"top_k": 4}}]), "drop cross_tokenizer.top_k"),
    "top_k across tokenizers without offline": (dict(stages=[{"kind": "distill", "top_k": 8, "cross_tokenizer": {}}]),
                                                "set cross_tokenizer.top_k instead"),
    "extra teacher missing": (dict(extra_teachers=[{"source": "/nonexistent/model"}]), "not found"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_recipe_one_line_error(case, tmp_path, tiny_teacher, capsys):
    sections, needle = BAD[case]
    path = _bad(tmp_path, tiny_teacher, **sections)
    assert main(["--recipe", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert needle in err, err
    assert not (tmp_path / "out").exists(), "a rejected recipe must write nothing"


def test_tokenizer_mismatch(tmp_path, tiny_teacher, other_tokenizer_model, capsys):
    path = _bad(tmp_path, tiny_teacher, student={"init": "checkpoint", "path": str(other_tokenizer_model)})
    assert main(["--recipe", str(path)]) == 2
    err = capsys.readouterr().err
    assert "tokenizers differ" in err and "teacher's tokenizer" in err


def test_extra_teacher_with_another_tokenizer(tmp_path, tiny_teacher, other_tokenizer_model, capsys):
    path = _bad(tmp_path, tiny_teacher, extra_teachers=[{"source": str(other_tokenizer_model), "weight": 0.5}])
    assert main(["--recipe", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "extra_teachers" in err and "every teacher must use the teacher's tokenizer" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_bad_override_and_missing_file(tmp_path, tiny_teacher, capsys):
    path = _bad(tmp_path, tiny_teacher)
    assert main(["--recipe", str(path), "train.max_steps"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert main(["--recipe", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_prints_no_traceback(tmp_path, tiny_teacher):
    path = _bad(tmp_path, tiny_teacher, train={"max_step": 3})
    p = subprocess.run([sys.executable, str(REPO / "launch/distill.py"), "--recipe", str(path)],
                       capture_output=True, text=True, env=run_env(), cwd=REPO)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and p.stderr.strip().count("\n") == 0, p.stderr


def test_stage_union_and_properties_come_from_the_registry(tmp_path, tiny_teacher):
    from compress.stages import STAGE_METHODS

    assert {"distill", "finetune", "eval"} <= set(STAGE_METHODS)
    path = write_recipe(tmp_path / "r.yaml", tiny_teacher, tmp_path / "out", plugins=["tests.toy_method"],
                        stages=[{"kind": "toy_mask"}, {"kind": "finetune", "max_steps": 2}, {"kind": "eval"}])
    r = load_recipe(path)
    assert [type(s).__name__ for s in r.stages] == ["ToyMaskStage", "FinetuneStage", "EvalStage"]
    assert [r.stage_steps(s) for s in r.stages] == [r.train.max_steps, 2, 0]
    assert r.needs_teacher  # only because of eval: finetune and the toy method read no teacher
    assert not load_recipe(path, ["stages=[{kind: toy_mask}, {kind: finetune}]"]).needs_teacher


def test_resume_with_nothing_to_resume(tmp_path, tiny_teacher, capsys):
    path = _bad(tmp_path, tiny_teacher)
    assert main(["--recipe", str(path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "has no run to resume" in err and "\n" not in err.strip()


def test_resume_with_another_number_of_ranks_is_refused(tmp_path, tiny_teacher):
    from compress.errors import CompressError
    from compress.pipeline import check_resumable

    r = load_recipe(_bad(tmp_path, tiny_teacher))
    out = tmp_path / "out"
    (out / "stages/0-distill/checkpoints").mkdir(parents=True)
    (out / "run.json").write_text('{"world": 2, "wandb_id": "abc"}')
    assert check_resumable(out, r, world=2, resume=True)["wandb_id"] == "abc"
    with pytest.raises(CompressError, match="was run with 2 rank.* resumed with 1"):
        check_resumable(out, r, world=1, resume=False)


def test_compress_never_imports_eval_or_launch():
    import ast

    for path in sorted((REPO / "compress").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad = [n for n in names if n.split(".")[0] in ("eval", "launch", "benchmarks", "tests")]
            assert not bad, f"{path.relative_to(REPO)} imports {bad}: compress/ is the core, nothing above it"


def test_kernels_import_only_torch_triton_and_themselves():
    import ast
    import sys

    allowed = {"torch", "triton", "kernels", "__future__"} | set(sys.stdlib_module_names)
    for path in sorted((REPO / "kernels").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad = [n for n in names if n.split(".")[0] not in allowed]
            assert not bad, f"{path.relative_to(REPO)} imports {bad}: kernels/ stands on torch and triton alone"
