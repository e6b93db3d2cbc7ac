"""Reconstruction PSNR of inversion on ShapesWorld renders: invert a ground-truth render under its caption,
regenerate, compare (and the VAE alone, the ceiling). ``python benchmarks/inversion.py --model shapes-dit``.

UNet models: DDIM inversion with and without the negative-prompt fix; flow-matching models (SD3, FLUX, FLUX.2,
Qwen-Image, Z-Image, ...): Euler inversion with and without fixed-point refinement. Writes ``--json`` with every per-image value.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import attnctl
from attnctl.inversion import decode_latents, encode_image, invert, psnr, regenerate
from attnctl.shapes.data import make_dataset


def _uint8(x):
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--n", type=int, default=16, help="renders (1-2 objects)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=4.5)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    pipe = attnctl.load(args.model)
    images, captions, _ = make_dataset(args.n, seed=123, max_objects=2)
    flow = not hasattr(pipe, "unet")
    variants = {"refine=0": dict(refine=0), "refine=3": dict(refine=3)} if flow else {
        "negative-prompt fix": dict(fix="negative-prompt"), "no fix": dict(fix="none")}
    vae = []
    size = int(images[0].shape[0])
    for image in images:  # the VAE alone: the image encoded, then decoded by the pipeline's own decode path
        decoded = decode_latents(pipe, encode_image(pipe, image), size, size)
        vae.append(psnr(image, _uint8(decoded[0])))
    report = {"model": args.model, "n": args.n, "steps": args.steps, "guidance_scale": args.guidance_scale,
              "vae_psnr": {"mean": float(np.mean(vae)), "values": [round(v, 2) for v in vae]}, "variants": {}}
    for name, kwargs in variants.items():
        start, values = time.perf_counter(), []
        for image, caption in zip(images, captions):
            inversion = invert(pipe, image, caption, args.steps, guidance_scale=args.guidance_scale, **kwargs)
            values.append(psnr(image, _uint8(regenerate(pipe, inversion).images[0])))
        report["variants"][name] = {"mean": float(np.mean(values)), "min": float(np.min(values)),
                                    "values": [round(v, 2) for v in values],
                                    "seconds": round(time.perf_counter() - start, 1)}
    print(f"{args.model}: {args.n} renders, {args.steps} steps, CFG {args.guidance_scale}; "
          f"VAE alone {report['vae_psnr']['mean']:.2f} dB")
    for name, r in report["variants"].items():
        print(f"  {name:22} mean {r['mean']:.2f} dB, min {r['min']:.2f} dB ({r['seconds']} s)")
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
