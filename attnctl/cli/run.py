"""``attnctl run RECIPE``: validate a recipe and generate its images into a new run folder."""

from __future__ import annotations

HELP = "run a YAML recipe: images, run.json and attention maps in a new run folder"


def add_arguments(parser) -> None:
    parser.add_argument("recipe", help="path to a recipe YAML file")
    parser.add_argument("--out", default=None, help="parent folder for the run folder (default: recipe's output)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set steps=10 --set controls.maps.words=[cat]")
    parser.add_argument("--dry-run", action="store_true", help="validate and print what would run, generate nothing")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args) -> int:
    from pathlib import Path

    from ..recipe import load_recipe
    from ..run import items_of, run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    items = items_of(recipe)
    if args.dry_run:
        print(f"recipe {args.recipe} is valid: model {recipe.model}, {len(items)} image(s), {recipe.steps} steps, "
              f"controls: {', '.join(recipe.controls) or 'none'}")
        for prompt, seed in items:
            print(f"  seed {seed}: {prompt}")
        return 0
    folder = run_recipe(recipe, out=args.out, name=Path(args.recipe).stem, progress=not args.quiet)
    print(f"wrote {len(items)} image(s) to {folder}")
    return 0
