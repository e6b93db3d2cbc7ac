"""``attnctl schema``: the recipe format as JSON Schema, for editors."""

from __future__ import annotations

HELP = "print the recipe JSON Schema"


def add_arguments(parser) -> None:
    pass


def main(args) -> int:
    import json

    from ..recipe import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0
