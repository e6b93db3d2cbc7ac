"""``attnctl`` command line: thin verbs over the library, one module per verb.

Registry: a verb is one module in this package plus one line in ``VERBS``. Each verb module defines ``HELP``,
``add_arguments(parser)`` and ``main(args) -> int`` and imports heavy libraries only inside ``main``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

VERBS = {
    "run": "attnctl.cli.run",
    "schema": "attnctl.cli.schema",
    "layers": "attnctl.cli.layers",
    "bench": "attnctl.cli.bench",
    "hunt": "attnctl.cli.hunt",
    "eval": "attnctl.cli.eval",
    "train": "attnctl.cli.train",
    "app": "attnctl.cli.app",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnctl",
        description="Attention control for diffusers pipelines (SD1.5, SDXL, SD3, FLUX).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of short error messages")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, module_name in VERBS.items():
        module = importlib.import_module(module_name)
        verb_parser = sub.add_parser(verb, help=module.HELP, description=module.HELP)
        module.add_arguments(verb_parser)
        verb_parser.set_defaults(_module=module)
    return parser


class _TorchvisionNotice(logging.Filter):
    """Drops transformers' notice that an image processor falls back to its PIL backend without torchvision.

    diffusers' pipeline modules name ``CLIPImageProcessor`` and ``SiglipImageProcessor``, so every command that
    loads a pipeline printed two such lines; attnctl needs neither torchvision nor those processors (safety
    checker and IP-Adapter inputs), so the notice says nothing to its users. Every other warning passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def quiet_known_notices() -> None:
    """Install the filters of known, meaningless library notices (idempotent). ``main`` calls it, so every verb
    has it, ``attnctl app`` included; ``python app/app.py`` and library use keep the libraries' own logging."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _TorchvisionNotice) for f in logger.filters):
        logger.addFilter(_TorchvisionNotice())


def hide_loading_bars() -> None:
    """No "Loading pipeline components / weights" bars from diffusers and transformers (``--quiet``)."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def add_process_options(parser, quiet_help: str, distributed_help: str) -> None:
    """``--quiet`` and ``--distributed N`` of the verbs that generate (run, hunt); ``start`` acts on them."""
    parser.add_argument("--quiet", action="store_true", help=quiet_help)
    parser.add_argument("--distributed", type=int, default=None, metavar="N", help=distributed_help)


def start(args) -> int | None:
    """Before a generating verb's work: with ``--distributed N`` (and not already launched) run the same command
    as N processes under accelerate and return its exit status; else hide the loading bars for ``--quiet`` and
    return None (go on)."""
    from ..processes import launched, relaunch

    if args.distributed is not None and not launched():
        return relaunch(args.argv, args.distributed)
    if args.quiet:
        hide_loading_bars()
    return None


def main(argv: list[str] | None = None) -> int:
    quiet_known_notices()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the words as given: a verb that relaunches itself (``--distributed N``) passes them on
    if args.verb is None:
        parser.print_help()
        return 0
    from ..errors import AttnctlError

    try:
        return int(args._module.main(args) or 0)
    except AttnctlError as exc:
        if args.debug:
            raise
        print(f"attnctl {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"attnctl {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`attnctl run R --dry-run | head`): stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141


if __name__ == "__main__":
    sys.exit(main())
