"""attnctl: attention control for diffusers pipelines."""

__version__ = "0.1.0"
