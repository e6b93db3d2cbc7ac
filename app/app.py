"""Launch the attnctl web app: `python app/app.py` here, or as a Hugging Face Space entry point (app.py).

Needs `pip install "attnctl[app]"`. Settings from the environment: ATTNCTL_MODEL (default shapes); the host and
port follow Gradio's GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (default 127.0.0.1:7860).
"""

import os

from attnctl.app import build_app

demo = build_app(os.environ.get("ATTNCTL_MODEL", "shapes"))

if __name__ == "__main__":
    demo.launch()
