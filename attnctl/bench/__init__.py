"""Benchmarks: a registry of name -> "module:function". Each returns a list of JSON-able row dicts.

Each control adds its settings here (one line each). ``run_bench`` prints the table and writes JSON.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from ..errors import AttnctlError

BENCHES = {
    "overhead": "attnctl.bench.overhead:run",
    "kernel": "attnctl.bench.kernel:run",
    "pipeline": "attnctl.bench.pipeline:run",
    "fullsize": "attnctl.bench.fullsize:run",
}


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    if not rows:
        print("(no rows)")
        return
    columns = columns or list(rows[0])

    def fmt(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    table = [columns] + [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def run_bench(name: str, *, json_path: str | None = None, **kwargs) -> list[dict]:
    if name not in BENCHES:
        raise AttnctlError(f"unknown benchmark {name!r}; allowed: {', '.join(sorted(BENCHES))}")
    module_name, func = BENCHES[name].split(":")
    rows, columns = getattr(importlib.import_module(module_name), func)(**kwargs)
    print_table(rows, columns)
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(rows, indent=2))
        tmp.replace(path)  # never a half-written file
        print(f"wrote {path}")
    return rows
