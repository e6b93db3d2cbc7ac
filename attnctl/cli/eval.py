"""``attnctl eval SUITE``: ShapesBench, baseline vs. a recipe's controls on the same prompts and seeds."""

from __future__ import annotations

HELP = ("evaluate a recipe's controls against the baseline "
        "(suites: quality, presence, crowded, layout, interp, edit, negative)")


def add_arguments(parser) -> None:
    from ..evals import SUITES

    parser.add_argument("suite", choices=sorted(SUITES), help="which suite")
    parser.add_argument("--model", default=None, help="model string (default: the recipe's, else shapes)")
    parser.add_argument("--recipe", default=None, help="recipe whose controls (and steps, guidance, size) to use; "
                        "with a sweep: every setting is evaluated against one shared baseline")
    parser.add_argument("--prompts", default=None, help="file with one case per line (see the suite's format)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per prompt (default: the suite's)")
    parser.add_argument("--seed-start", type=int, default=0, metavar="N",
                        help="seeds N, N+1, ... instead of 0, 1, ...: figures on seeds that chose nothing")
    parser.add_argument("--limit", type=int, default=None, help="only the first N cases (a quick look)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per pipeline call")
    parser.add_argument("--json", dest="json_path", default=None, help="write the report as JSON here")


def main(args) -> int:
    from ..evals import run_eval

    run_eval(args.suite, model=args.model, recipe=args.recipe, prompts=args.prompts, seeds=args.seeds,
             limit=args.limit, seed_start=args.seed_start, batch_size=args.batch_size, json_path=args.json_path)
    return 0
