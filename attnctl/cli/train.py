"""``attnctl train shapes|shapes-dit``: train an embedded ShapesWorld model (seeded, resumable)."""

from __future__ import annotations

HELP = "train the embedded ShapesWorld model shapes (SD format) or shapes-dit (SD3 format); resumable"


def add_arguments(parser) -> None:
    parser.add_argument("model", choices=["shapes", "shapes-dit"], help="which model")
    parser.add_argument("--out", required=True, help="training folder: checkpoint state.pt, pipeline/ at the end")
    parser.add_argument("--steps", type=int, default=None, help="denoiser steps (default: the model's config)")
    parser.add_argument("--batch", type=int, default=None, help="batch size")
    parser.add_argument("--vae-from", default=None,
                        help="reuse the VAE of this pipeline folder (e.g. assets/shapes for shapes-dit)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--fresh", action="store_true", help="start afresh even if out/state.pt exists")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke configuration (tests, CI)")
    parser.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                        help="any TrainConfig field, e.g. --set lr=3e-4 --set dit_layers=6")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args) -> int:
    import yaml

    from ..errors import AttnctlError
    from ..shapes.train import default_config, tiny_config, train

    options = {}
    for assignment in args.options:
        key, sep, raw = assignment.partition("=")
        if not sep:
            raise AttnctlError(f"--set {assignment!r}: write key=value, e.g. --set lr=3e-4")
        value = yaml.safe_load(raw)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "3e-4" (no dot) as a string; the help's own example must work
                value = float(value)
            except ValueError:
                pass
        options[key.strip()] = tuple(value) if isinstance(value, list) else value
    for name, value in (("steps", args.steps), ("batch", args.batch), ("vae_from", args.vae_from),
                        ("threads", args.threads)):
        if value is not None:
            options[name] = value
    config = (tiny_config if args.tiny else default_config)(args.model, **options)
    folder = train(args.model, args.out, resume=not args.fresh, device=args.device, config=config,
                   progress=not args.quiet)
    print(f"trained {args.model}: pipeline in {folder} (load it with attnctl.load({str(folder)!r}))")
    return 0
