"""Run logging: ``<output_dir>/metrics.jsonl`` always, wandb (offline by default) on rank 0."""

from __future__ import annotations

import json
import os
from pathlib import Path

from compress.checkpoint import publish_file


class RunLogger:
    """Append-only metrics on rank 0. ``rewind(stage, step)`` drops lines a resumed run redoes."""

    def __init__(self, output_dir: str, wandb_cfg, config: dict, is_main: bool, run_id: str | None = None):
        self.is_main = is_main
        self.path = Path(output_dir) / "metrics.jsonl"
        self.run = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if wandb_cfg.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            # the same id on every (re)start: a resumed run continues its wandb run
            self.run = wandb.init(project=wandb_cfg.project, name=wandb_cfg.name, mode=wandb_cfg.mode, id=run_id,
                                  resume="allow" if run_id else None, dir=output_dir, config=config,
                                  reinit="finish_previous")

    def rewind(self, stage: int, step: int) -> None:
        """Forget records of ``stage`` after ``step`` (they are about to be recomputed)."""
        if not self.is_main or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line and not (json.loads(line).get("stage") == stage and json.loads(line).get("step", 0) > step)]
        publish_file(self.path, lambda tmp: tmp.write_text("".join(k + "\n" for k in keep)))

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None:
            prefix = f"stage{record.get('stage', 0)}/"
            self.run.log({prefix + k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"})

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update({k: v for k, v in values.items() if isinstance(v, (int, float, str))})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def read_metrics(output_dir: str) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x] if path.exists() else []


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table; floats get 4 significant digits."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, int) and abs(v) >= 10_000:
            return f"{v:,}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
