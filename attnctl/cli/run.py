"""``attnctl run RECIPE``: validate a recipe and generate its images into a new run folder."""

from __future__ import annotations

from . import add_process_options, start

HELP = "run a YAML recipe: images, run.json and attention maps in a new run folder"


def add_arguments(parser) -> None:
    parser.add_argument("recipe", help="path to a recipe YAML file")
    parser.add_argument("--out", default=None, help="parent folder for the run folder (default: recipe's output)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set steps=10 --set controls.maps.words=[cat] "
                             "--set prompt.1='a blue star' (list items by index)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print what would run, generate nothing")
    add_process_options(parser, "no progress bars", "split the items over N processes (launches `accelerate launch "
                        "--multi_gpu --num_processes N -m attnctl run ...`; works on CPU too)")


def main(args) -> int:
    import os
    from pathlib import Path

    from ..recipe import load_recipe
    from ..run import items_of, run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    items = items_of(recipe)
    if args.dry_run:
        settings = recipe.settings()
        print(f"recipe {args.recipe} is valid: model {recipe.model}, {len(items)} image(s), "
              f"{len(settings)} setting(s), controls: {', '.join(recipe.controls) or 'none'}")
        for item in items:
            values = ", ".join(f"{k}={v}" for k, v in item.values)
            print(f"  {item.stem}: seed {item.seed}: {item.prompt}" + (f"  [{values}]" if values else ""))
        return 0
    status = start(args)
    if status is not None:
        return status
    folder = run_recipe(recipe, out=args.out, name=Path(args.recipe).stem, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {len(items)} item(s) to {folder}")
    return 0
