"""HeadHunter: greedy search for the attention heads whose perturbation guides best.

HeadHunter (Ahn et al., NeurIPS 2025, arXiv 2506.10978; repo cvlab-kaist/HeadHunter): keep a set S of
selected heads, initially empty. Each round, every candidate head h not in S is scored by generating the
recipe's images with PAG on S + {h} and scoring them with an objective (the paper: PickScore); the top k
candidates join S. After R rounds S is the answer (the repo's defaults: k = 3, 5 rounds, guidance scale 3).

Here the candidates are the heads of the recipe's ``perturb`` layers (every self/joint/single-stream head
when it names none), the guidance settings (scale, u, window, schedule, mode) are the recipe's, and the
images are the recipe's (prompt, seed) items. Candidates share one pipeline call: ``batch`` candidates of
one item run as ``batch`` samples of that item's seed, each sample with its own head set, so one denoiser
call holds [uncond x batch, cond x batch, perturbed x batch]; where that runs out of memory, the calls
shrink (halved until they fit) and the search goes on. Objectives are a registry (``OBJECTIVES``)
of ``name -> "module:factory"`` (built in: ``shapes``, ``clip``, ``pickscore``; a user's own is named
``module.path:Factory`` on the command line); a factory gets an optional argument (``clip:MODEL_ID``) and
returns an object with ``score(images uint8 (N, H, W, 3), prompts) -> float64 (N,)`` (higher is better).

The state is a JSON file rewritten atomically after every batch, so an interrupted hunt resumes where it
stopped (same recipe and settings) and a finished one can be extended with more rounds.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .controls.perturb import PERTURBABLE_KINDS, Perturb
from .errors import AttnctlError, RecipeError, did_you_mean

OBJECTIVES: dict[str, str] = {
    "shapes": "attnctl.hunt:ShapesObjective",
    "shapes-graded": "attnctl.hunt:GradedShapesObjective",
    "clip": "attnctl.hunt:ClipObjective",
    "pickscore": "attnctl.hunt:PickScoreObjective",
}

Head = tuple[str, int]  # (site name, head index)


# -- objectives --------------------------------------------------------------------------------------------
class ShapesObjective:
    """ShapesBench score: the fraction of the caption's objects the ShapesWorld detector finds (colour and
    shape), plus 1 when all are present. Offline; meant for the ``shapes`` models."""

    name = "shapes"

    def __init__(self, argument: str | None = None):
        if argument:
            raise AttnctlError(f"objective {self.name!r} takes no argument (got {argument!r})")

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        from .shapes.detect import detect

        return np.asarray([self.score_one(detect(image), prompt) for image, prompt in zip(images, prompts)],
                          dtype=np.float64)

    def score_one(self, detections, prompt: str) -> float:
        from .shapes.validate import match

        result = match(prompt, detections)
        return result.n_present / max(1, len(result.expected)) + float(result.all_present)


class GradedShapesObjective(ShapesObjective):
    """The ``shapes`` score with margins, so candidates do not tie: 1 when the detector finds every named object,
    plus the mean over the named objects of how closely the best detection in each one's colour matches its shape's
    prototype (``attnctl.shapes.graded``, 0..1). Offline; meant for the ``shapes`` models."""

    name = "shapes-graded"

    def score_one(self, detections, prompt: str) -> float:
        from .shapes.graded import object_score
        from .shapes.validate import match

        result = match(prompt, detections)
        margins = [object_score(detections, colour, shape) for colour, shape in result.expected]
        return float(result.all_present) + (float(np.mean(margins)) if margins else 0.0)


class ClipObjective:
    """CLIP score: 100 x cosine similarity of image and prompt embeddings of any CLIP model, loaded through
    transformers. Argument ``MODEL`` or ``MODEL,PROCESSOR`` (hub ids or local folders; the processor defaults to
    the model's own): ``clip:openai/clip-vit-large-patch14``."""

    name = "clip"
    default_model: str | None = None
    default_processor: str | None = None  # None: the model's own

    def __init__(self, argument: str | None = None):
        from transformers import CLIPModel, CLIPProcessor

        model_id, processor_id = self.ids(argument)
        try:
            self.model = CLIPModel.from_pretrained(model_id).eval()
            self.processor = CLIPProcessor.from_pretrained(processor_id)
        except (OSError, ValueError) as exc:
            raise AttnctlError(f"objective {self.name!r}: cannot load CLIP model {model_id!r} with processor "
                               f"{processor_id!r}: {exc}") from None

    @classmethod
    def ids(cls, argument: str | None) -> tuple[str, str]:
        """(model, processor) from ``MODEL[,PROCESSOR]`` and the class defaults."""
        model_id, _, processor_id = (argument or "").partition(",")
        model_id = model_id.strip() or cls.default_model
        if not model_id:
            raise AttnctlError(f"objective {cls.name!r} needs a model id or folder: --objective {cls.name}:MODEL "
                               f"(or MODEL,PROCESSOR)")
        return model_id, processor_id.strip() or cls.default_processor or model_id

    def scale(self) -> float:
        return 100.0

    @torch.no_grad()
    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        inputs = self.processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True,
                                truncation=True)
        out = self.model(**inputs)
        image = torch.nn.functional.normalize(out.image_embeds.double(), dim=-1)
        text = torch.nn.functional.normalize(out.text_embeds.double(), dim=-1)
        return (self.scale() * (image * text).sum(-1)).numpy()


class PickScoreObjective(ClipObjective):
    """PickScore (Kirstain et al. 2023), HeadHunter's quality objective: a CLIP-H fine-tuned on human
    preferences, scored as ``exp(logit_scale) x cosine`` as its authors do. ``pickscore`` loads
    ``yuvalkirstain/PickScore_v1`` with the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the model's
    repository ships none); ``pickscore:MODEL[,PROCESSOR]`` another copy (e.g. a local folder)."""

    name = "pickscore"
    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())


def load_objective(spec: str, *, user_objectives: bool = True):
    """``NAME`` or ``NAME:ARGUMENT`` -> an objective instance.

    ``NAME`` is a registered objective (``OBJECTIVES``) or your own as ``module:factory`` (``module.path:Class``
    or ``module.path:Class:ARGUMENT``, importable from the working directory or the environment): a factory taking the optional
    argument and returning an object with ``score(images uint8 (N, H, W, 3), prompts) -> (N,) floats``.
    ``user_objectives=False`` allows only the registered ones (the app: a form field must not name any callable
    of the server's Python, ``os:system:...``).
    """
    name, _, argument = spec.partition(":")
    if name in OBJECTIVES:
        module, attr = OBJECTIVES[name].split(":")
        return getattr(importlib.import_module(module), attr)(argument or None)
    attr, _, argument = argument.partition(":")
    factory = _user_factory(name, attr) if attr and user_objectives else None
    if factory is None:
        own = ", or your own as module.path:Factory[:ARGUMENT]" if user_objectives else ""
        raise AttnctlError(f"unknown objective {name!r}{did_you_mean(name, OBJECTIVES)}; allowed: "
                           f"{', '.join(OBJECTIVES)}{own}")
    scorer = factory(argument or None)
    if not callable(getattr(scorer, "score", None)):
        raise AttnctlError(f"objective {name}:{attr} returned {type(scorer).__name__}, which has no "
                           "score(images, prompts) method")
    return scorer


def _user_factory(module_name: str, attr: str):
    """``module_name.attr`` when the module imports and has it, else None (a typo stays an 'unknown' error).

    The working directory is put on ``sys.path`` first (as uvicorn does for its apps), so ``my_objectives.py``
    next to the recipe is found from the ``attnctl`` command too, whose script directory is not the cwd."""
    import sys

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            return None  # the module itself is missing
        raise AttnctlError(f"objective module {module_name!r} failed to import: {exc}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise AttnctlError(f"objective module {module_name!r} has no {attr!r}")
    return factory


# -- one batched generation with a head set per sample ---------------------------------------------------------
class HeadSets(Perturb):
    """``perturb`` whose perturbed rows take the head set of their sample: ``sets[k]`` for sample k."""

    def __init__(self, options, candidates: list[Head]):
        super().__init__(options)
        self.candidates = candidates
        self.sets: list[list[Head]] = []

    def bind(self, session):
        return {name: None for name in sorted({name for name, _ in self.candidates})}

    @property
    def active(self) -> bool:
        return self.options.u > 0 and any(self.sets)

    def row_strengths(self, call):
        rows = call.layout.rows(self.branch)
        if not rows:
            return None
        u = torch.zeros(call.q.shape[0], call.q.shape[1], dtype=call.q.dtype, device=call.q.device)
        for r in rows:
            for name, head in self.sets[call.layout.samples[r]]:
                if name == call.site.name:
                    u[r, head] = self.options.u
        return u


def candidate_heads(pipe, selectors: list[str] | None) -> list[Head]:
    """Every (site, head) the selectors name among ``pipe``'s perturbable attention sites, in model order."""
    from .adapters import adapter_for
    from .select import select

    adapter = adapter_for(pipe)
    sites = [site for site, _ in adapter.sites(adapter.denoiser(pipe))]
    chosen = select(sites, selectors, kinds=PERTURBABLE_KINDS)
    heads = []
    for site in sites:
        if site.name in chosen:
            heads += [(site.name, h) for h in (chosen[site.name] or range(site.heads))]
    return heads


def generate_sets(pipe, recipe, control: HeadSets, prompt: str, seed: int, sets: list[list[Head]]) -> np.ndarray:
    """One pipeline call for ``prompt``: sample k from ``seed`` with PAG on ``sets[k]``. uint8 (K, H, W, 3).

    Call inside ``apply(pipe, control)``. Each sample has its own generator seeded with ``seed``, so every
    candidate starts from the same noise, as a separate run of that item would.
    """
    control.sets = sets
    kwargs = dict(num_inference_steps=recipe.steps, guidance_scale=recipe.guidance_scale, output_type="np",
                  generator=[torch.Generator("cpu").manual_seed(seed) for _ in sets])
    if recipe.negative_prompt is not None:
        kwargs["negative_prompt"] = [recipe.negative_prompt] * len(sets)
    if recipe.height:
        kwargs["height"] = recipe.height
    if recipe.width:
        kwargs["width"] = recipe.width
    images = pipe(prompt=[prompt] * len(sets), **kwargs).images
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


# -- the search ------------------------------------------------------------------------------------------------
def head_key(head: Head) -> str:
    return f"{head[0]}:{head[1]}"


def parse_key(key: str) -> Head:
    name, _, head = key.rpartition(":")
    return name, int(head)


@dataclass
class HuntState:
    """What the JSON file holds. ``rounds``: finished rounds ({scores, chosen, best}); ``partial``: candidate
    scores of the round under way."""

    settings: dict
    baseline: float | None = None
    rounds: list[dict] = field(default_factory=list)
    partial: dict[str, float] = field(default_factory=dict)
    snippet: str | None = None  # the recipe snippet of the selected heads, once a round chose some
    stopped: str | None = None  # why the search ended before its last round (``min_gain``), if it did

    @property
    def selected(self) -> list[Head]:
        return [parse_key(k) for r in self.rounds for k in r["chosen"]]

    def to_json(self) -> dict:
        data = {"settings": self.settings, "baseline": self.baseline, "rounds": self.rounds,
                "partial": self.partial, "selected": [head_key(h) for h in self.selected]}
        if self.stopped is not None:
            data["stopped"] = self.stopped
        return data

    def save(self, path: Path, snippet: str | None = None) -> None:
        if snippet is not None:
            self.snippet = snippet
        data = self.to_json()
        if self.snippet is not None:
            data["recipe_snippet"] = self.snippet
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)


def load_state(path: Path, settings: dict) -> HuntState:
    if not path.is_file():
        return HuntState(settings)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AttnctlError(f"cannot resume from {path}: {exc}; remove it to start afresh") from None
    if data.get("settings") != settings:
        theirs = data.get("settings", {})
        changed = sorted(k for k in set(settings) | set(theirs) if settings.get(k) != theirs.get(k))
        raise AttnctlError(f"{path} holds a hunt with other settings ({', '.join(changed)} differ); "
                           "use another --json path or remove the file")
    return HuntState(settings, data.get("baseline"), data.get("rounds", []), data.get("partial", {}),
                     data.get("recipe_snippet"))


def recipe_snippet(options: dict, heads: list[Head]) -> str | None:
    """The ``controls: perturb:`` block that perturbs ``heads`` with the hunt's guidance settings (None for no
    heads: a perturb block needs at least one layer)."""
    import yaml

    if not heads:
        return None

    by_site: dict[str, list[int]] = {}
    for name, head in heads:
        by_site.setdefault(name, []).append(head)
    layers = [f"{name}:heads={','.join(str(h) for h in sorted(hs))}" for name, hs in by_site.items()]
    block = {k: v for k, v in options.items() if k not in ("layers", "targets")}
    block["layers"] = layers
    return yaml.safe_dump({"controls": {"perturb": block}}, sort_keys=False)


def hunt(recipe, *, objective: str = "shapes", rounds: int = 2, top_k: int = 1, json_path: str | Path | None = None,
         batch: int = 8, pipe=None, progress: Callable[[str], None] | None = print,
         distributed: bool | None = None, user_objectives: bool = True,
         min_gain: float | None = None) -> HuntState:
    """Run (or resume) a HeadHunter search for ``recipe`` (a validated ``Recipe`` with a ``perturb`` control).

    Returns the state; the file at ``json_path`` (none: the state lives in memory only) holds it, with
    ``recipe_snippet`` once a round finished. Under accelerate (``distributed``, see ``attnctl.processes``) the
    candidate batches of a round are dealt out to the processes in turn and their scores gathered after each
    wave, so every process holds the same state and process 0 writes the file; the chosen heads are those of a
    single-process search with the same ``batch``. A ``pipe`` passed in gets its own scheduler back at the end.
    ``user_objectives``: whether ``objective`` may name a user's ``module:Factory`` (see ``load_objective``).
    ``min_gain``: stop at the first round whose best candidate raises the score by less than this over the heads
    chosen so far, without adding its heads (None: always ``rounds`` rounds, as the paper). That round's scores
    stay in the file's ``partial``, so a resumed search with a lower ``min_gain`` takes them up unrecomputed.
    """
    from .engine import apply
    from .models import load
    from .processes import Processes
    from .run import items_of, set_scheduler

    if rounds < 1 or top_k < 1 or batch < 1:
        raise AttnctlError(f"--rounds, --top-k and --batch must be >= 1 (got {rounds}, {top_k}, {batch})")
    entry = recipe.controls.get("perturb")
    if entry is None or isinstance(entry, list):
        raise RecipeError("attnctl hunt needs a recipe with one `controls: perturb:` block (its layers are the "
                          "candidate pool, its scale/u/window/mode the guidance); e.g. perturb: {scale: 3.0}")
    options = Perturb.Options(**entry)
    if options.targets is not None:
        raise RecipeError("attnctl hunt: give the candidate layers as `perturb: layers:` (one u), not `targets`")
    scorer = load_objective(objective, user_objectives=user_objectives)
    procs = Processes(distributed)
    if pipe is None:
        pipe = load(recipe.model, device=procs.device or recipe.device, dtype=recipe.dtype)
        pipe.set_progress_bar_config(disable=True)
    items = [(item.prompt, item.seed) for item in items_of(recipe) if item.setting == 0]
    guidance = options.model_dump(exclude={"layers", "targets"}, exclude_defaults=False)
    settings = {"model": recipe.model, "items": [list(i) for i in items], "steps": recipe.steps,
                "guidance_scale": recipe.guidance_scale, "size": [recipe.height, recipe.width],
                "objective": objective, "top_k": top_k, "perturb": options.model_dump()}
    path = Path(json_path) if json_path is not None else None
    state = load_state(path, settings) if path is not None else HuntState(settings)
    procs.barrier()  # every process has read the file before process 0 rewrites it

    def save(snippet: str | None = None) -> None:
        if path is not None and procs.main:
            state.save(path, snippet)
        elif snippet is not None:
            state.snippet = snippet

    say = progress if (progress and procs.main) else (lambda message: None)
    control = HeadSets(options, candidate_heads(pipe, options.layers))

    fit = {"batch": batch}  # the most candidates one call has room for; an out-of-memory error halves it

    def images_of(prompt: str, seed: int, sets: list[list[Head]]) -> np.ndarray:
        """``generate_sets`` in calls of at most ``fit["batch"]`` samples, halving it on out-of-memory errors
        (accelerate's test of the error: CUDA/XPU/MPS/CPU allocator messages) until one sample per call."""
        from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

        parts, start = [], 0
        while start < len(sets):
            size = fit["batch"]
            try:
                parts.append(generate_sets(pipe, recipe, control, prompt, seed, sets[start : start + size]))
            except Exception as exc:
                if size == 1 or not should_reduce_batch_size(exc):
                    raise
                clear_device_cache(garbage_collection=True)
                fit["batch"] = size // 2
                say(f"out of memory with {size} candidates a call: continuing with {fit['batch']}")
                continue
            start += size
        return np.concatenate(parts)

    def score_sets(sets: list[list[Head]]) -> np.ndarray:
        """Mean objective over the recipe's items for each head set: (len(sets),)."""
        total = np.zeros(len(sets))
        for prompt, seed in items:
            total += scorer.score(images_of(prompt, seed, sets), [prompt] * len(sets))
        return total / len(items)

    own_scheduler = pipe.scheduler
    set_scheduler(pipe, recipe.scheduler, recipe.scheduler_options)
    try:
        with apply(pipe, control):
            if state.baseline is None:
                state.baseline = procs.broadcast(float(score_sets([[]])[0]) if procs.main else None)
                save()
            say(f"baseline (no perturbation): {state.baseline:.4f}; {len(control.candidates)} candidate heads, "
                f"{len(items)} image(s) each" + (f", {procs.world} processes" if procs.world > 1 else ""))
            for round_index in range(len(state.rounds), rounds):
                selected = state.selected
                pool = [h for h in control.candidates if h not in selected]
                todo = [h for h in pool if head_key(h) not in state.partial]
                chunks = [todo[start : start + batch] for start in range(0, len(todo), batch)]
                for wave in range(0, len(chunks), procs.world):  # one chunk per process, then gather
                    chunk = chunks[wave + procs.rank] if wave + procs.rank < len(chunks) else []
                    scores = score_sets([selected + [h] for h in chunk]) if chunk else []
                    state.partial.update(procs.gather([(head_key(h), float(s)) for h, s in zip(chunk, scores)]))
                    save()
                    say(f"round {round_index + 1}: scored {len(state.partial)}/{len(pool)} candidates")
                if not state.partial:
                    say("no candidates left")
                    break
                ranked = sorted(state.partial.items(), key=lambda kv: (-kv[1], kv[0]))  # ties: by name
                chosen = [k for k, _ in ranked[:top_k]]
                before = state.rounds[-1]["best"] if state.rounds else state.baseline
                gain = ranked[0][1] - before  # <= 0: no candidate beat the heads chosen so far
                if min_gain is not None and gain < min_gain:
                    state.stopped = (f"round {round_index + 1}: the best candidate ({ranked[0][0]}, "
                                     f"{ranked[0][1]:.4f}) gains {gain:+.4f} < min_gain {min_gain:+.4f}; "
                                     f"kept the {len(state.selected)} head(s) chosen before")
                    save()
                    say(f"stopped at {state.stopped}")
                    break
                state.rounds.append({"scores": dict(state.partial), "chosen": chosen, "best": ranked[0][1],
                                     "gain": gain})
                state.partial = {}
                save(recipe_snippet(guidance, state.selected))
                say(f"round {round_index + 1}: chose {', '.join(chosen)} (best {ranked[0][1]:.4f}, {gain:+.4f}"
                    + ("; no candidate improved the score" if gain <= 0 else "") + ")")
    finally:
        pipe.scheduler = own_scheduler
    save(recipe_snippet(guidance, state.selected))
    procs.barrier()
    return state
