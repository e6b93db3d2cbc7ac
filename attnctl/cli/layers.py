"""``attnctl layers MODEL``: every attention layer with its kind, heads, head_dim and token counts."""

from __future__ import annotations

import json

HELP = "list the attention layers of a model (kind, heads, head_dim, query/key tokens)"


def add_arguments(parser) -> None:
    parser.add_argument("model", help="model string: tiny:sd15|tiny:sdxl|tiny:sd3|tiny:flux|tiny:flux2|tiny:flux2-dev|tiny:chroma|tiny:qwenimage|tiny:zimage, shapes, a folder or hub id")
    parser.add_argument("--height", type=int, default=None, help="image height in pixels for token counts")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels for token counts")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--device", default="auto")


def main(args) -> int:
    from ..inspect import layer_table

    rows = layer_table(args.model, height=args.height, width=args.width, device=args.device)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("layer", "kind", "heads", "head_dim", "queries", "keys", "grid")
    table = [header] + [(r["layer"], r["kind"], str(r["heads"]), str(r["head_dim"]), str(r["queries"]),
                         str(r["keys"]), "x".join(map(str, r["grid"])) if r["grid"] else "-") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0
