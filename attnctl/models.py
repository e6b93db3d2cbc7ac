"""Model strings -> pipelines, one resolver used by the CLI, recipes, the app and Python.

``tiny:sd15`` | ``tiny:sdxl`` | ``tiny:sd3`` | ``tiny:flux`` | ``tiny:flux2`` | ``tiny:flux2-dev`` | ...: random tiny
pipelines built offline (tests, docs; ``attnctl.testing.TINY_FAMILIES``).
``shapes`` | ``shapes-dit``: the embedded ShapesWorld models shipped in the package (when present).
A local folder or a hub id: ``DiffusionPipeline.from_pretrained`` (safetensors only unless
``allow_pickle=True``). The family is detected from the loaded pipeline by the adapters.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import ModelError

EMBEDDED = {"shapes": "shapes", "shapes-dit": "shapes-dit"}
DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def assets_dir() -> Path:
    """Where the embedded model folders live: the installed package data, or the repository's ``assets/``."""
    packaged = Path(__file__).parent / "assets"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "assets"


def embedded_path(name: str) -> Path | None:
    path = assets_dir() / EMBEDDED[name]
    return path if (path / "model_index.json").is_file() else None


def resolve_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ModelError(f"unknown device {device!r}; allowed: auto, cpu, cuda, cuda:N, mps") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for, but CUDA is not available here; use device: auto or cpu")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    chosen = DTYPES[dtype]
    if chosen is None:  # auto: half precision on GPUs, float32 on CPU (bf16 is slower on CPU)
        chosen = torch.float16 if device.type == "cuda" else torch.float32
    return chosen


def load(model: str, *, device: str | None = "auto", dtype: str | torch.dtype | None = "auto",
         allow_pickle: bool = False):
    """Load a pipeline from a model string (see the module docstring) onto ``device`` in ``dtype``."""
    from .adapters import adapter_for
    from .testing import TINY_FAMILIES, tiny_pipeline

    if not isinstance(model, str) or not model.strip():
        raise ModelError(f"a model string must be a non-empty string, got {model!r}")
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    if model.startswith("tiny:"):
        family = model.split(":", 1)[1]
        if family not in TINY_FAMILIES:
            raise ModelError(f"unknown tiny model {model!r}; allowed: " +
                             ", ".join(f"tiny:{f}" for f in TINY_FAMILIES))
        pipe = tiny_pipeline(family)
        pipe.to(target, torch_dtype) if torch_dtype != torch.float32 else pipe.to(target)
    else:
        if model in EMBEDDED:
            path = embedded_path(model)
            if path is None:
                raise ModelError(f"the embedded model {model!r} is not in this installation ({assets_dir()}); "
                                 "use tiny:sd15 meanwhile, or train it with `attnctl train " + model + "`")
            source, local = str(path), True
        else:
            source, local = model, os.path.isdir(model)
        from diffusers import DiffusionPipeline

        from diffusers.utils import deprecation_utils

        # diffusers renamed torch_dtype to dtype (0.42 warns on the old name); older releases know only torch_dtype.
        dtype_key = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
        kwargs = {dtype_key: torch_dtype, "use_safetensors": not allow_pickle}
        if local:
            kwargs["local_files_only"] = True
            kwargs.update(_absent_components(Path(source)))
        try:
            pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
        except Exception as exc:  # hub/network/format problems: one clear message
            hint = ("it is not a local folder, and loading it as a hub id failed (no network, or no such repo)"
                    if not local else "the folder is not a complete diffusers pipeline")
            raise ModelError(f"cannot load model {model!r}: {hint}. ({type(exc).__name__}: {exc})") from None
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()
        pipe.to(target)
    adapter_for(pipe)  # unsupported families fail here, naming the supported ones
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _absent_components(folder: Path) -> dict:
    """Components saved as absent (``[null, null]``, e.g. SD3 without T5) must be passed as None to load."""
    import json

    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: None for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0] is None}


def model_family(model: str) -> str | None:
    """The family a model string names, read without loading any weights: ``tiny:FAMILY``, an embedded model or a
    local folder (its ``model_index.json``). None when that cannot be known here (a hub id, a folder without a
    readable index or with a denoiser no adapter names); loading the model says then."""
    import json

    from .adapters import family_from_index
    from .testing import TINY_ADAPTER_FAMILY, TINY_FAMILIES

    if not isinstance(model, str):
        return None
    if model.startswith("tiny:"):
        family = model.split(":", 1)[1]
        return TINY_ADAPTER_FAMILY.get(family, family) if family in TINY_FAMILIES else None
    folder = embedded_path(model) if model in EMBEDDED else (Path(model) if os.path.isdir(model) else None)
    if folder is None:
        return None
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    return family_from_index(index) if isinstance(index, dict) else None


def family_of(pipe) -> str:
    from .adapters import adapter_for

    return adapter_for(pipe).family
