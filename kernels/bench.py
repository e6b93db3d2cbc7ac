"""Benchmark entry point: ``python kernels/bench.py [--shapes a,b] [--dtype bf16] [--repeats 20] [--json PATH]``.

The benchmark itself is ``attnctl.kernels.bench.run_kernel_bench`` (also ``attnctl bench kernel``). Needs a
CUDA GPU; prints a table and the performance target checks, writes JSON (default: kernels/results/<gpu>.json).
"""

import argparse
import re
import sys
from pathlib import Path

from attnctl.errors import AttnctlError
from attnctl.kernels.bench import run_kernel_bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", help="comma-separated shape names (default: all)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="output path (default: kernels/results/<gpu name>.json)")
    args = parser.parse_args()
    try:
        import torch

        name = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()) if torch.cuda.is_available() else "cpu"
        json_path = args.json or str(Path(__file__).parent / "results" / f"{name}-{args.dtype}.json")
        if torch.cuda.is_available():  # on CPU run_kernel_bench says a GPU is needed; leave no folder behind
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        run_kernel_bench(args.shapes.split(",") if args.shapes else None, args.dtype, args.repeats, json_path)
    except AttnctlError as exc:
        sys.exit(f"error: {exc}")
