"""``attnctl app``: serve the web app (Gradio) on loopback by default."""

from __future__ import annotations

HELP = "serve the web app (Gradio; needs the app extra: pip install 'attnctl[app]')"


def add_arguments(parser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--model", default="shapes", help="initial model string (default shapes)")
    parser.add_argument("--concurrency", type=int, default=2,
                        help="generations in flight at most (one per loaded model in any case; default 2)")


def main(args) -> int:
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from ..app import build_app

    build_app(args.model, concurrency=args.concurrency).launch(server_name=args.host, server_port=args.port)
    return 0
