"""``attnctl hunt RECIPE``: HeadHunter, a greedy search for the heads whose perturbation guides best."""

from __future__ import annotations

from . import add_process_options, start

HELP = "greedy head search (HeadHunter) for a recipe's perturb control; writes the chosen heads as a recipe snippet"


def add_arguments(parser) -> None:
    parser.add_argument("recipe", help="recipe YAML with a `controls: perturb:` block (its layers = candidates)")
    parser.add_argument("--objective", default="shapes",
                        help="shapes (ShapesBench detector score, offline), shapes-graded (the same with margins: "
                             "how closely each object matches its shape, so heads do not tie), "
                             "clip:MODEL[,PROCESSOR] (CLIP score of "
                             "a CLIP id or folder), pickscore[:MODEL[,PROCESSOR]] (the paper's objective), or "
                             "your own module.path:Factory[:ARGUMENT]")
    parser.add_argument("--rounds", type=int, default=2, help="greedy rounds (default 2)")
    parser.add_argument("--top-k", type=int, default=1, help="heads added per round (default 1)")
    parser.add_argument("--batch", type=int, default=8, help="candidates per pipeline call (default 8)")
    parser.add_argument("--min-gain", type=float, default=None, metavar="G",
                        help="stop when a round's best candidate raises the score by less than G over the heads "
                             "chosen so far (its heads are not added); default: run every round, as the paper")
    parser.add_argument("--json", dest="json_path", default=None,
                        help="state/result file; an existing one resumes (default hunt-RECIPE.json)")
    parser.add_argument("--snippet", default=None, help="also write the recipe snippet (YAML) to this path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set steps=10")
    add_process_options(parser, "no progress lines", "score each round's candidate batches in N processes "
                        "(launches `accelerate launch --multi_gpu --num_processes N -m attnctl hunt ...`; works on "
                        "CPU too)")


def main(args) -> int:
    import os
    from pathlib import Path

    from ..hunt import hunt
    from ..recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    status = start(args)
    if status is not None:
        return status
    json_path = args.json_path or f"hunt-{Path(args.recipe).stem}.json"
    state = hunt(recipe, objective=args.objective, rounds=args.rounds, top_k=args.top_k, json_path=json_path,
                 batch=args.batch, progress=None if args.quiet else print, min_gain=args.min_gain)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"chosen heads ({len(state.selected)}), baseline {state.baseline:.4f}, "
          f"best per round {[round(r['best'], 4) for r in state.rounds]}; state in {json_path}")
    if state.stopped:
        print(f"stopped early: {state.stopped}")
    if state.snippet is None:
        print("no heads chosen: no recipe snippet" + (f" ({args.snippet} not written)" if args.snippet else ""))
        return 0
    if args.snippet:
        Path(args.snippet).write_text(state.snippet)
    print(state.snippet, end="")
    return 0
