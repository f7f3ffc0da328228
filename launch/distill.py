"""Run a compression recipe.

    deepspeed launch/distill.py --recipe recipes/smollm2_distill.yaml [key.sub=value ...]
    deepspeed --num_gpus 2 launch/distill.py --recipe ...      # 2 ranks (CPU: DS_ACCELERATOR=cpu)
    python launch/distill.py --recipe ... --dry-run            # print the resolved recipe, exit

The recipe and its fit to the model (layers, tokenizers, files) are checked before DeepSpeed
starts or any weights load; a mistake prints one line and exits with status 2.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="YAML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20 output_dir=runs/x")
    parser.add_argument("--dry-run", action="store_true", help="validate, print the resolved recipe, exit")
    parser.add_argument("--fresh", action="store_true", help="discard checkpoints in output_dir and start over")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint (the default); fails if there is nothing to resume")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    args = parser.parse_args(argv)

    from compress.errors import CompressError, GateFailure

    try:
        from compress.models import check_fit
        from compress.recipe import dump_recipe, load_recipe
        from eval import stage as _eval_stage  # noqa: F401  (registers `kind: eval`)

        recipe = load_recipe(args.recipe, args.overrides)
        check_fit(recipe)
        if args.dry_run:
            print(dump_recipe(recipe), end="")
            return 0
        if "DS_ACCELERATOR" not in os.environ:
            import torch

            if not torch.cuda.is_available():
                os.environ["DS_ACCELERATOR"] = "cpu"
        from compress.pipeline import run

        run(recipe, fresh=args.fresh, resume=args.resume)
    except GateFailure as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except CompressError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
