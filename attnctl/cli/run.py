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
    parser.add_argument("--compare", action="store_true",
                        help="also generate every image without the controls (same prompts and seeds) and write "
                             "baseline | controlled sheets with each image's diagnostics (compare*.png)")
    parser.add_argument("--sheet", default=None, metavar="PNG",
                        help="also write the run's sheet (compare.png with --compare, else contact_sheet.png) "
                             "to this path; an existing file there is replaced only if attnctl wrote it")
    add_process_options(parser, "no progress bars", "split the items over N processes (launches `accelerate launch "
                        "--multi_gpu --num_processes N -m attnctl run ...`; works on CPU too)")


def main(args) -> int:
    import os
    from pathlib import Path

    from ..compare import check_comparable, writable_sheet_path, write_sheet
    from ..recipe import load_recipes
    from ..run import items_of, part_name, run_recipes

    recipes = load_recipes(args.recipe, args.overrides)
    if args.compare:
        for i, recipe in enumerate(recipes):
            check_comparable(recipe, args.recipe if len(recipes) == 1 else f"recipe {i + 1} of {len(recipes)} in "
                             f"{args.recipe}")
    if args.sheet:
        writable_sheet_path(args.sheet)  # refuse before generating anything
    n_items = sum(len(items_of(r)) for r in recipes)
    if args.dry_run:
        for i, recipe in enumerate(recipes):
            items = items_of(recipe)
            settings = recipe.settings()
            head = f"recipe {args.recipe}" if len(recipes) == 1 else f"{part_name(i, recipe)} in {args.recipe}"
            print(f"{head} is valid: model {recipe.model}, {len(items)} image(s), "
                  f"{len(settings)} setting(s), controls: {', '.join(recipe.controls) or 'none'}"
                  + (" (and each without them: --compare)" if args.compare else ""))
            for item in items:
                values = ", ".join(f"{k}={v}" for k, v in item.values)
                print(f"  {item.stem}: seed {item.seed}: {item.prompt}" + (f"  [{values}]" if values else ""))
        return 0
    status = start(args)
    if status is not None:
        return status
    folder = run_recipes(recipes, out=args.out, name=Path(args.recipe).stem, progress=not args.quiet,
                         compare=args.compare)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {n_items} item(s) to {folder}")
        if args.sheet:
            sheet = folder / ("compare.png" if args.compare else "contact_sheet.png")
            if sheet.exists():
                write_sheet(sheet, args.sheet)
                print(f"sheet: {args.sheet}")
            else:
                print(f"no sheet to copy to {args.sheet}: a run of one image has none")
    return 0
