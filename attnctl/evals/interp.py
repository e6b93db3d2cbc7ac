"""``interp``: how smoothly and consistently a sequence morphs from prompt A to prompt B.

Each case is a prompt pair and a seed. Baseline: naive text-embedding interpolation (in-between frames
conditioned on the linear interpolation of A's and B's text encodings, uniform coefficients, attention
untouched), with the same seeds and frame count as the recipe's ``interpolate`` control; controlled: that
control. Metrics (AID paper, Sec. 5.1), over the distances between adjacent frames: ``smoothness`` = 1 - Gini
(higher is better: the change is spread evenly), ``consistency`` = their mean (lower is better), and
``max_jump`` = their maximum (lower is better). The distance is the control's ``distance`` option (weight-free by
default: mean CIE76 Delta E in Lab) and is named in the JSON.

Built-in cases: 24 ShapesWorld pairs (8 change only the colour, 8 only the shape, 8 both). A ``--prompts``
file gives one pair per line, ``prompt A | prompt B`` (more ``|`` make a chain A -> B -> C).
"""

from __future__ import annotations

from ..controls.interpolate import Interpolate, sequence_metrics
from ..errors import AttnctlError
from ..shapes.data import COLOURS, SHAPES
from .base import Case, Suite

DEFAULT_FRAMES = 9


def builtin_pairs() -> list[tuple[str, str]]:
    """24 deterministic pairs of single-object captions: colour-only, shape-only and both changes."""
    colours, shapes = list(COLOURS), list(SHAPES)
    pairs = []
    for i in range(8):
        shape = shapes[i % 4]
        pairs.append((f"a {colours[i % 6]} {shape}", f"a {colours[(i + 2) % 6]} {shape}"))
    for i in range(8):
        colour = colours[i % 6]
        pairs.append((f"a {colour} {shapes[i % 4]}", f"a {colour} {shapes[(i + 1 + i // 4) % 4]}"))
    for i in range(8):
        pairs.append((f"a {colours[(i + 1) % 6]} {shapes[i % 4]}", f"a {colours[(i + 4) % 6]} {shapes[(i + 2) % 4]}"))
    return pairs


def parse_line(line: str) -> list[str]:
    prompts = [p.strip() for p in line.split("|")]
    if len(prompts) < 2 or any(not p for p in prompts):
        raise AttnctlError(f"interp prompts line {line!r}: write 'prompt A | prompt B' (two or more non-empty "
                           "prompts separated by '|')")
    return prompts


class InterpSuite(Suite):
    name = "interp"
    description = "smoothness and consistency of prompt-to-prompt interpolation (vs. text-embedding lerp)"
    metrics = {"smoothness": True, "consistency": False, "max_jump": False}
    default_seeds = 2
    line_format = "one pair per line: 'prompt A | prompt B'"

    def __init__(self):
        self._distance = None

    def cases(self, lines, seeds):
        chains = [parse_line(line) for line in lines] if lines else [list(p) for p in builtin_pairs()]
        return [Case(" | ".join(chain), seed, {"prompts": chain}) for chain in chains for seed in range(seeds)]

    def generate(self, pipe, settings, cases, controls):
        from ..engine import apply

        recipe_options = dict(settings.controls.get("interpolate") or {})
        kwargs = {k: v for k, v in settings.call_kwargs().items() if k != "output_type"}
        interp = next((c for c in controls or [] if isinstance(c, Interpolate)), None)
        if controls and interp is None:
            raise AttnctlError("eval interp: the recipe has no interpolate control (controls: {interpolate: ...})")
        if interp is None:  # the baseline: same frame count, same seeds, no attention interpolation
            interp = Interpolate(frames=recipe_options.get("frames", DEFAULT_FRAMES), mode="embedding",
                                 spacing="uniform", distance=recipe_options.get("distance", "lab"),
                                 latents=recipe_options.get("latents", "shared"), seeds=recipe_options.get("seeds"))
        self._distance = interp.options.distance
        outputs = []
        with apply(pipe, controls or [interp]):
            for case in cases:
                result = interp.generate(pipe, seed=case.seed, prompts=case.info["prompts"], **kwargs)
                outputs.append(result.metadata)
        return outputs

    def score(self, case, output):
        metrics = sequence_metrics(output["distances"])
        return {"smoothness": metrics["smoothness"], "consistency": metrics["consistency"],
                "max_jump": max(output["distances"]), "distances": metrics["distances"], "t": output["t"],
                **({"alpha_beta": output["alpha_beta"]} if "alpha_beta" in output else {})}

    def extra(self):
        from ..interpolation import DISTANCES

        distance = self._distance or "lab"
        return {"distance": distance, "distance_description": DISTANCES[distance]}


SUITE = InterpSuite()
