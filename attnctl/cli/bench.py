"""``attnctl bench NAME``: benchmarks that print a table and write JSON. They never assert on time."""

from __future__ import annotations

HELP = "run a benchmark (overhead, ...) and print a table; --json PATH writes the rows"


def add_arguments(parser) -> None:
    from ..bench import BENCHES

    parser.add_argument("name", choices=sorted(BENCHES), help="which benchmark")
    parser.add_argument("--json", dest="json_path", default=None, help="write the rows as JSON to this path")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per setting (median, min, max)")
    parser.add_argument("--families", default=None, help="comma-separated families (default: all tiny ones)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats: a smoke run, not a measure")
    parser.add_argument("--settings", default=None, help="pipeline: comma-separated settings (default: all)")
    parser.add_argument("--interleave", action="store_true",
                        help="pipeline: one process per family running the settings in turn (ratios robust to a "
                             "shared machine; peak memory then shared)")


def main(args) -> int:
    from ..bench import run_bench

    extra = {"settings": args.settings.split(",")} if args.settings else {}
    if args.interleave:
        if args.name != "pipeline":
            from ..errors import AttnctlError

            raise AttnctlError(f"--interleave is an option of `bench pipeline`, not of `bench {args.name}`")
        extra["interleave"] = True
    run_bench(args.name, json_path=args.json_path, repeats=args.repeats,
              families=args.families.split(",") if args.families else None, quick=args.quick, **extra)
    return 0
