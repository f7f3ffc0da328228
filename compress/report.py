"""A report a person can read: ``<out>/report.md`` (and .html) with tables and matplotlib PNGs.

    write_report(out_dir, results=eval_results, metrics=read_metrics(out_dir), summary=summary)

Plots: training loss per stage (from metrics.jsonl), quality vs size for every model evaluated
(ppl ratio and MMLU against bytes), speculative acceptance rate and speedup against k, and for an
upcycled MoE (``final/expert_utilization.json``) each layer's share of routings per expert, at
init and after training.
"""

from __future__ import annotations

from pathlib import Path

from compress.tracking import format_table


def pyplot():
    """matplotlib's pyplot on the file-only backend: reports and benchmarks draw with no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110, tight: bool = True) -> bool:
    """Writes ``fig`` as a PNG (whatever ``path`` ends with: a temporary name too) and frees it."""
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi, format="png")
    pyplot().close(fig)
    return True


def plot_loss(metrics: list[dict], path: Path) -> bool:
    rows = [r for r in metrics if "loss" in r]
    if not rows:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for stage in sorted({r["stage"] for r in rows}):
        pts = [(r["step"], r["loss"]) for r in rows if r["stage"] == stage]
        ax.plot(*zip(*pts), marker=".", label=f"stage {stage}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    return save_figure(fig, path)


def plot_quality_vs_size(models: list[dict], path: Path) -> bool:
    if len(models) < 2:
        return False
    plt = pyplot()
    with_mmlu = [m for m in models if m.get("mmlu") is not None]
    fig, axes = plt.subplots(1, 2 if with_mmlu else 1, figsize=(9 if with_mmlu else 5, 3.2), squeeze=False)
    ax = axes[0][0]
    for m in models:
        ax.scatter(m["bytes"] / 2**20, m["ppl_ratio"])
        ax.annotate(m["name"], (m["bytes"] / 2**20, m["ppl_ratio"]), fontsize=8)
    ax.set_xlabel("weights (MiB)")
    ax.set_ylabel("bits per byte / teacher's" if models[0].get("bpb") else "perplexity / teacher's")
    ax.set_yscale("log")
    if with_mmlu:
        ax = axes[0][1]
        for m in with_mmlu:
            ax.scatter(m["bytes"] / 2**20, m["mmlu"])
            ax.annotate(m["name"], (m["bytes"] / 2**20, m["mmlu"]), fontsize=8)
        ax.axhline(0.25, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("weights (MiB)")
        ax.set_ylabel("MMLU accuracy (0.25 = chance)")
    return save_figure(fig, path)


def plot_speculative(spec: list[dict], path: Path) -> bool:
    spec = [r for r in spec if "acceptance_rate" in r]  # rows skipped by an early stop have none
    if not spec:
        return False
    plt = pyplot()
    ks = [r["k"] for r in spec]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(ks, [r["acceptance_rate"] for r in spec], marker="o", label="acceptance rate")
    ax.plot(ks, [r["speedup"] for r in spec], marker="s", label="speedup vs teacher alone")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("draft tokens per round (k)")
    ax.legend()
    return save_figure(fig, path)


# the phases an upcycled MoE's utilization is reported at: (label, key in expert_utilization.json)
_PHASES = (("at init", "utilization_at_init"), ("after training", "utilization"))


def plot_expert_utilization(experts: dict | None, path: Path) -> bool:
    """Heatmaps, layers x experts, of the share of (token, slot) routings each expert takes: at
    init and after training, on one colour scale centred on the even share 1/E."""
    if not experts or not experts.get("utilization"):
        return False
    panels = [(name, experts[key]) for name, key in _PHASES if experts.get(key)]
    plt = pyplot()
    from matplotlib.colors import TwoSlopeNorm

    n_layers, n_experts = len(panels[0][1]), len(panels[0][1][0])
    even = 1 / n_experts
    top = max(max(max(row) for row in util) for _, util in panels)
    norm = TwoSlopeNorm(vcenter=even, vmin=0.0, vmax=max(top, even * 1.01))
    width = 1.5 + len(panels) * (1.2 + 0.35 * n_experts)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, max(2.8, 1.2 + 0.15 * n_layers)), squeeze=False,
                             layout="constrained")
    for ax, (name, util) in zip(axes[0], panels):
        im = ax.imshow(util, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(n_experts))
        ax.set_ylabel("layer")
        layers = experts.get("moe_layers")  # some layers upcycled: label the rows with their indices
        if layers and layers != list(range(n_layers)) and n_layers <= 32:
            ax.set_yticks(range(n_layers), [str(l) for l in layers])
    fig.colorbar(im, ax=list(axes[0]), label=f"share of routings (even = {even:.3g})")
    return save_figure(fig, path, tight=False)  # constrained layout: tight_layout fights the shared colour bar


def expert_section(experts: dict | None) -> list[str]:
    """Total vs active parameters and how evenly each layer routes, at init and after training."""
    if not experts or not experts.get("utilization"):
        return []
    rows = []
    for name, key in _PHASES:
        util = experts.get(key)
        if util:
            even = 1 / len(util[0])
            worst = max(max(row) for row in util)
            rows.append({"when": name, "busiest expert / even share": worst / even,
                         "idlest expert / even share": min(min(row) for row in util) / even,
                         "layers with an expert under half its share": sum(min(row) < even / 2 for row in util)})
    params = experts.get("params", {})
    lines = ["## Experts (upcycled MoE)", ""]
    if params:
        lines += [f"- non-embedding parameters: {params['total']:,} total, {params['active']:,} active per token "
                  f"({params['active'] / params['total']:.0%})", ""]
    return lines + [format_table(rows, list(rows[0])), ""]


def _quality_models(results: dict | None, summary: dict | None) -> list[dict]:
    models = []
    if results:
        t, s = results["teacher"], results["student"]
        mmlu = next((k for k in s["lm_eval"] if k.startswith("mmlu")), None)
        bpb = "ppl_ratio" not in s  # a student with its own tokenizer: bits per byte, not per token
        models.append({"name": "teacher", "bytes": t["bytes"], "ppl_ratio": 1.0, "bpb": bpb,
                       "mmlu": t["lm_eval"][mmlu]["acc"] if mmlu else None})
        models.append({"name": "student", "bytes": s["bytes"], "ppl_ratio": s["bpb_ratio" if bpb else "ppl_ratio"],
                       "bpb": bpb, "mmlu": s["lm_eval"][mmlu]["acc"] if mmlu else None})
    elif summary:
        for row in summary.get("table", []):
            if row.get("bytes_on_disk") and row.get("ppl_ratio"):
                models.append({"name": row["model"], "bytes": row["bytes_on_disk"], "ppl_ratio": row["ppl_ratio"]})
    return models


def eval_tables(results: dict) -> str:
    t, s = results["teacher"], results["student"]
    # one tokenizer: token-level ppl ratio, agreement, KL; a student with its own: bits per byte
    cross = "bpb_ratio" in s
    rows = [{"model": "teacher", "params": t["params"], "bytes": t["bytes"], "ppl": t.get("ppl"),
             "ppl_ratio": None if cross else 1.0, "bpb": t.get("bpb"), "bpb_ratio": 1.0 if cross else None},
            {"model": "student", "params": s["params"], "bytes": s["bytes"], "ppl": s["student_ppl"],
             **{k: s.get(k) for k in ("ppl_ratio", "top1_agreement", "kl", "bpb_ratio")}, "bpb": s.get("student_bpb")}]
    for name, r in (("teacher", rows[0]), ("student", rows[1])):
        r.update(results["headline"][name])
    level = ["bpb", "bpb_ratio"] if cross else ["ppl_ratio", "top1_agreement", "kl"]
    cols = ["model", "params", "bytes", "ppl", *level, *results["headline"]["student"]]
    parts = ["## Quality vs the teacher", "", format_table(rows, cols)]
    if results.get("speculative_skipped"):
        parts += ["", f"Speculative decoding: skipped ({results['speculative_skipped']})."]
    if results["speculative"] and cross:  # a draft with its own tokenizer: no per-token acceptance
        spec_cols = ["k", "n_prompts", "target_tokens_per_pass", "target_tokens_per_s", "spec_tokens_per_s", "speedup",
                     "exact_match", "dtype", "stopped"]
        parts += ["", "## Speculative decoding (student drafts with its own tokenizer, teacher verifies)", "",
                  f"Served by {results['speculative'][0].get('method', 'transformers')}; target tokens per pass "
                  "counts the teacher's verification rounds (1 = no help from the draft).", "",
                  format_table(results["speculative"], spec_cols)]
    elif results["speculative"]:
        spec_cols = ["k", "n_prompts", "acceptance_rate", "mean_accepted_per_pass", "target_tokens_per_s", "spec_tokens_per_s",
                     "speedup", "exact_match", "first_divergence", "dtype", "graphs", "hf_assisted_tokens_per_s",
                     "hf_assisted_same_output", "stopped"]
        parts += ["", "## Speculative decoding (student drafts, teacher verifies)", "",
                  format_table(results["speculative"], spec_cols)]
    if results["gates"]:
        parts += ["", "## Gates", "", format_table(results["gates"], ["gate", "value", "threshold", "passed"])]
    if results.get("seconds"):
        parts += ["", "## Time per phase (s)", "",
                  format_table([{"phase": k, "seconds": v} for k, v in results["seconds"].items()], ["phase", "seconds"])]
    return "\n".join(parts)


def transform_sections(stages: list[dict]) -> list[str]:
    """What each one-shot transform reported (``transform.json``): values as a list, row lists as tables."""
    lines = []
    for st in stages:
        info = st.get("transform")
        if not info:
            continue
        lines += [f"## Stage {st['index']}: {st['kind']} (one-shot transform)", ""]
        tables = []
        for key, value in info.items():
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                tables.append((key, value))
            elif key != "metrics" and value is not None:
                lines.append(f"- {key}: {value}")
        if info.get("metrics"):
            m = info["metrics"]
            lines.append("- right after the transform: " + ", ".join(f"{k} {m[k]:.4g}" for k in
                                                                     ("student_ppl", "ppl_ratio", "top1_agreement", "kl") if k in m))
        for key, rows in tables:
            cols = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["", f"### {key}", "", format_table(rows, cols)]
        lines.append("")
    return lines


def write_report(out_dir: str | Path, *, results: dict | None = None, metrics: list[dict] = (),
                 summary: dict | None = None, logger=None, experts: dict | None = None) -> Path:
    """``experts``: an upcycled MoE's ``final/expert_utilization.json`` (read from ``out_dir`` when not given)."""
    out = Path(out_dir)
    util_file = out / "final" / "expert_utilization.json"
    if experts is None and util_file.is_file():
        import json

        experts = json.loads(util_file.read_text())
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    lines = [f"# Compression report: {out.name}", ""]
    if summary and summary.get("table"):
        lines += ["## Run", "", format_table(summary["table"], ["model", "params", "bytes_on_disk", "student_ppl",
                                                                "ppl_ratio", "top1_agreement", "kl"]), ""]
    if summary:
        lines += transform_sections(summary.get("stages", []))
    lines += expert_section(experts)
    if results:
        lines += [eval_tables(results), ""]
    plots = {"loss": plot_loss(list(metrics), figs / "loss.png"),
             "quality_vs_size": plot_quality_vs_size(_quality_models(results, summary), figs / "quality_vs_size.png"),
             "speculative": plot_speculative(results["speculative"] if results else [], figs / "speculative.png"),
             "expert_utilization": plot_expert_utilization(experts, figs / "expert_utilization.png")}
    for name, made in plots.items():
        if made:
            lines += [f"![{name}](figures/{name}.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    import markdown

    html = markdown.markdown("\n".join(lines), extensions=["tables"])
    style = "body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
    (out / "report.html").write_text(f"<!doctype html><meta charset=utf-8><style>{style}</style>{html}")
    if logger is not None and getattr(logger, "run", None) is not None:
        import wandb

        logger.run.log({f"report/{n}": wandb.Image(str(figs / f"{n}.png")) for n, made in plots.items() if made})
    return path
