"""The attnctl web app (Gradio 6): a thin layer that builds recipes and calls the library.

    from attnctl.app import build_app
    build_app("shapes").launch()            # or: attnctl app --model shapes

Optional: gradio comes with the ``app`` extra (``pip install "attnctl[app]"``); ``import attnctl`` never
imports this package. Layout: ``forms`` (options schema <-> form fields), ``pipelines`` (cached pipelines,
one generation per model at a time), ``jobs`` (a request: recipe -> ``run_recipe`` -> results), ``panels/``
(one module per panel, a registry), ``ui`` (the Blocks page and its endpoints).
"""

from __future__ import annotations


def _require_gradio() -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        from ..errors import AttnctlError

        raise AttnctlError('the app needs gradio: pip install "attnctl[app]"') from None


def build_app(model: str = "shapes", **kwargs):
    """The app's ``gradio.Blocks`` (not launched). Keyword arguments go to ``attnctl.app.ui.build_app``."""
    _require_gradio()
    from .ui import build_app as build

    return build(model, **kwargs)


def launch(host: str = "127.0.0.1", port: int = 7860, model: str = "shapes", **kwargs):
    """Build and serve the app on ``host:port`` (loopback by default); blocks until stopped."""
    demo = build_app(model)
    return demo.launch(server_name=host, server_port=port, **kwargs)


__all__ = ["build_app", "launch"]
