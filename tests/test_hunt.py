"""HeadHunter (`attnctl hunt`): batched candidates equal separate runs, the objective registry (ShapesBench and a
tiny random CLIP), resuming from the JSON state, and the recipe snippet."""

import json

import pytest
import torch
import yaml

from attnctl.cli import main
from attnctl.controls.perturb import Perturb, PerturbOptions
from attnctl.engine import apply
from attnctl.errors import AttnctlError
from attnctl.hunt import HeadSets, candidate_heads, load_objective
from attnctl.recipe import load_recipe
from attnctl.testing import tiny_call_kwargs, tiny_pipeline

MID = "mid_block.attentions.0.transformer_blocks.0.attn1"
DOWN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
PROMPT = "a red circle"
RECIPE = """model: tiny:sd15
prompt: [a red circle]
seeds: [0]
steps: 2
height: 32
width: 32
controls:
  perturb: {scale: 2.0, layers: ["mid_block:heads=0-2"]}
"""


def test_candidates_in_one_batch_equal_separate_runs():
    """Three candidate head sets as three samples of one call give each set's own single-image run."""
    pipe = tiny_pipeline("sd15")
    options = PerturbOptions(scale=2.0)
    sets = [[(MID, 0)], [(MID, 3), (DOWN, 1)], []]
    control = HeadSets(options, candidate_heads(pipe, [MID, DOWN]))
    generators = [torch.Generator().manual_seed(0) for _ in sets]
    with apply(pipe, control):
        control.sets = sets
        batched = pipe([PROMPT] * 3, **tiny_call_kwargs("sd15", generator=generators)).images
    for k, heads in enumerate(sets):
        layers = [f"{name}:heads={h}" for name, h in heads] or [MID]
        with apply(pipe, Perturb(scale=2.0 if heads else 0.0, layers=layers)):
            single = pipe(PROMPT, **tiny_call_kwargs("sd15")).images
        assert (batched[k] - single[0]).abs().max() <= 1e-4
    assert (batched[0] - batched[1]).abs().max() > 1e-3


def tiny_clip(folder, processor_folder=None):
    """A random 1-layer CLIP saved to ``folder`` (32 px images): a continuous objective for tests. Its processor
    goes to ``processor_folder`` when given (PickScore's repository ships none: it uses LAION's)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from attnctl.tokenizers import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=len(tokenizer) - 2,
                         eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                     crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(processor_folder or folder)
    return folder


def test_objectives_registry(tmp_path):
    tiny_clip(tmp_path / "clip")
    images = torch.randint(0, 256, (3, 32, 32, 3), generator=torch.Generator().manual_seed(0)).numpy()
    images = images.astype("uint8")
    clip = load_objective(f"clip:{tmp_path / 'clip'}")
    scores = clip.score(images, ["a red circle", "a blue square", "a red circle"])
    assert scores.shape == (3,) and abs(scores).max() <= 100 and len(set(scores.round(6))) == 3
    shapes = load_objective("shapes").score(images, ["a red circle"] * 3)
    assert shapes.shape == (3,) and ((shapes >= 0) & (shapes <= 2)).all()
    with pytest.raises(AttnctlError, match=r"unknown objective 'clp'.*did you mean 'clip'"):
        load_objective("clp")
    with pytest.raises(AttnctlError, match="cannot load CLIP model"):
        load_objective(f"clip:{tmp_path / 'missing'}")


def test_pickscore_objective_and_its_default_ids(tmp_path):
    """pickscore = exp(logit_scale) x cosine, with the model and its processor from separate places."""
    from attnctl.hunt import ClipObjective, PickScoreObjective

    model, processor = tmp_path / "pick", tmp_path / "laion"
    tiny_clip(model, processor)
    assert not (model / "preprocessor_config.json").exists()
    images = torch.randint(0, 256, (2, 32, 32, 3), generator=torch.Generator().manual_seed(1)).numpy()
    images = images.astype("uint8")
    prompts = ["a red circle", "a blue square"]
    pick = load_objective(f"pickscore:{model},{processor}")
    clip = load_objective(f"clip:{model},{processor}")
    factor = float(pick.model.logit_scale.detach().exp())
    assert abs(factor - 100.0) > 1.0  # the two scales differ, so the check below can fail
    torch.testing.assert_close(torch.as_tensor(pick.score(images, prompts)),
                               torch.as_tensor(clip.score(images, prompts)) * factor / 100.0)
    assert PickScoreObjective.ids(None) == ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    assert PickScoreObjective.ids("my/copy") == ("my/copy", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    assert ClipObjective.ids("m") == ("m", "m") and ClipObjective.ids("m, p") == ("m", "p")
    with pytest.raises(AttnctlError, match=r"objective 'clip' needs a model id"):
        load_objective("clip")
    with pytest.raises(AttnctlError, match=r"cannot load CLIP model .* with processor"):
        load_objective(f"clip:{model}")  # the model folder has no processor


def test_user_objective_from_a_module(tmp_path, monkeypatch):
    (tmp_path / "my_objectives.py").write_text(
        "import numpy as np\n"
        "class Brightness:\n"
        "    def __init__(self, argument=None):\n"
        "        self.weight = float(argument or 1)\n"
        "    def score(self, images, prompts):\n"
        "        return self.weight * images.reshape(len(images), -1).mean(1) / 255.0\n"
        "def broken(argument=None):\n"
        "    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    images = torch.zeros(2, 8, 8, 3, dtype=torch.uint8).numpy()
    images[1] = 255
    scorer = load_objective("my_objectives:Brightness:2")
    assert scorer.score(images, ["a", "b"]).tolist() == [0.0, 2.0]
    with pytest.raises(AttnctlError, match=r"objective module 'my_objectives' has no 'Nope'"):
        load_objective("my_objectives:Nope")
    with pytest.raises(AttnctlError, match=r"returned int, which has no score"):
        load_objective("my_objectives:broken")
    with pytest.raises(AttnctlError, match=r"unknown objective 'pickscor'.*did you mean 'pickscore'.*module.path"):
        load_objective("pickscor:x")
    with pytest.raises(AttnctlError, match=r"unknown objective 'my_objectives'; allowed: shapes, shapes-graded, clip, pickscore$"):
        load_objective("my_objectives:Brightness", user_objectives=False)


def test_hunt_rounds_resume_and_snippet(tmp_path, capsys):
    recipe = tmp_path / "hunt.yaml"
    recipe.write_text(RECIPE)
    state_path = tmp_path / "state.json"
    args = ["hunt", str(recipe), "--objective", "shapes", "--top-k", "1", "--batch", "2", "--json", str(state_path),
            "--quiet"]
    assert main(args + ["--rounds", "1"]) == 0
    first = json.loads(state_path.read_text())
    assert len(first["rounds"]) == 1 and set(first["rounds"][0]["scores"]) == {f"{MID}:{h}" for h in range(3)}
    # A round left half-done resumes from its scores: a planted score is kept, not recomputed, and wins.
    other = next(f"{MID}:{h}" for h in range(3) if f"{MID}:{h}" not in first["selected"])
    planted = dict(first, partial={other: 99.0})
    state_path.write_text(json.dumps(planted))
    assert main(args + ["--rounds", "2", "--snippet", str(tmp_path / "snippet.yaml")]) == 0
    second = json.loads(state_path.read_text())
    assert second["rounds"][0] == first["rounds"][0]
    assert second["rounds"][1]["chosen"] == list(planted["partial"]) and second["rounds"][1]["best"] == 99.0
    assert second["rounds"][1]["gain"] == 99.0 - first["rounds"][0]["best"]  # against the round before
    assert first["rounds"][0]["gain"] == first["rounds"][0]["best"] - first["baseline"]
    assert len(second["rounds"][1]["scores"]) == 2 and second["partial"] == {}
    snippet = yaml.safe_load((tmp_path / "snippet.yaml").read_text())
    heads = sorted(int(k.rsplit(":", 1)[1]) for k in second["selected"])
    assert snippet["controls"]["perturb"]["layers"] == [f"{MID}:heads={','.join(map(str, heads))}"]
    runnable = load_recipe({**yaml.safe_load(RECIPE), **snippet})
    assert runnable.controls["perturb"]["scale"] == 2.0
    assert "chosen heads (2)" in capsys.readouterr().out
    # Other settings with the same state file: an error, not silent mixing.
    assert main(args + ["--rounds", "2", "--set", "steps=3"]) == 2
    assert "other settings (steps differ)" in capsys.readouterr().err


def test_out_of_memory_halves_the_calls_and_the_search_goes_on(tmp_path, monkeypatch, capsys):
    """A call with more than one candidate 'runs out of memory' (the CUDA allocator's message): the hunt halves
    its calls down to one candidate and ends with the scores of a hunt run one candidate a call; any other
    error still stops it."""
    import attnctl.hunt as hunt_module

    real = hunt_module.generate_sets
    sizes: list[int] = []

    def tight(pipe, recipe, control, prompt, seed, sets):
        sizes.append(len(sets))
        if len(sets) > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(pipe, recipe, control, prompt, seed, sets)

    recipe = load_recipe(yaml.safe_load(RECIPE.replace("heads=0-2", "heads=0-3")))
    one = hunt_module.hunt(recipe, rounds=1, batch=1, progress=None)
    monkeypatch.setattr(hunt_module, "generate_sets", tight)
    squeezed = hunt_module.hunt(recipe, rounds=1, batch=4, progress=print)
    assert squeezed.rounds[0]["scores"] == one.rounds[0]["scores"] and len(one.rounds[0]["scores"]) == 4
    assert sizes[:4] == [1, 4, 2, 1]  # baseline, then the first chunk: 4 -> 2 -> 1, and 1 from then on
    assert set(sizes[4:]) == {1}
    out = capsys.readouterr().out
    assert "out of memory with 4 candidates a call: continuing with 2" in out
    assert "out of memory with 2 candidates a call: continuing with 1" in out

    def broken(*args):
        raise RuntimeError("something else")

    monkeypatch.setattr(hunt_module, "generate_sets", broken)
    with pytest.raises(RuntimeError, match="something else"):
        hunt_module.hunt(recipe, rounds=1, batch=4, progress=None)


def test_min_gain_stops_without_adding_heads_and_resumes(tmp_path, capsys):
    """--min-gain G: a round whose best candidate gains less than G ends the search without its heads (no
    snippet for no heads); its scores stay in the file, so a resumed search with a lower G takes them up."""
    recipe = tmp_path / "hunt.yaml"
    recipe.write_text(RECIPE)
    state_path, snippet_path = tmp_path / "state.json", tmp_path / "snippet.yaml"
    args = ["hunt", str(recipe), "--batch", "3", "--json", str(state_path), "--quiet", "--rounds", "1",
            "--snippet", str(snippet_path)]
    assert main(args) == 0  # a real round, for a state file with this recipe's settings
    flat = json.loads(state_path.read_text())
    heads = sorted(flat["rounds"][0]["scores"])
    flat.update(baseline=1.0, rounds=[], partial={heads[0]: 1.0, heads[1]: 0.5, heads[2]: 0.9},
                recipe_snippet=None)
    state_path.write_text(json.dumps(flat))
    snippet_path.unlink()
    capsys.readouterr()
    assert main(args + ["--min-gain", "0.01"]) == 0  # the best ties the baseline: gain 0 < 0.01
    out = capsys.readouterr().out
    saved = json.loads(state_path.read_text())
    assert saved["rounds"] == [] and saved["selected"] == [] and "recipe_snippet" not in saved
    assert saved["partial"] == flat["partial"] and saved["stopped"].startswith("round 1: the best candidate")
    assert "stopped early: round 1" in out and "gains +0.0000 < min_gain +0.0100" in out
    assert "no heads chosen: no recipe snippet" in out and not snippet_path.exists()
    assert main(args + ["--min-gain", "0"]) == 0  # a tie is no loss: the same scores, now taken
    saved = json.loads(state_path.read_text())
    assert saved["selected"] == [heads[0]] and saved["rounds"][0]["scores"] == flat["partial"]
    assert "stopped" not in saved
    assert yaml.safe_load(snippet_path.read_text())["controls"]["perturb"]["layers"] == [
        f"{MID}:heads={heads[0].rsplit(':', 1)[1]}"]


def test_hunt_needs_a_perturb_block(tmp_path, capsys):
    recipe = tmp_path / "plain.yaml"
    recipe.write_text(RECIPE.split("controls:")[0])
    assert main(["hunt", str(recipe), "--json", str(tmp_path / "s.json")]) == 2
    assert "needs a recipe with one `controls: perturb:` block" in capsys.readouterr().err


def test_two_process_hunt_equals_one_process(tmp_path):
    """accelerate with 2 CPU processes: the candidate batches are dealt out, every score lands under its own
    head, and the rounds (scores, choices) and the snippet equal a 1-process hunt's."""
    import os
    import subprocess
    import sys

    clip = tiny_clip(tmp_path / "clip")  # continuous scores: a score under the wrong head would show
    recipe = tmp_path / "hunt.yaml"
    recipe.write_text(RECIPE)
    args = ["hunt", str(recipe), "--objective", f"clip:{clip}", "--rounds", "2", "--batch", "1", "--quiet"]
    assert main(args + ["--json", str(tmp_path / "one.json")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "attnctl"] + args + ["--json", str(tmp_path / "two.json"),
                                                                      "--distributed", "2"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("chosen heads (2)") == 1  # process 0 reports
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert len(set(one["rounds"][0]["scores"].values())) == 3  # three candidates, three different scores
    assert two["rounds"] == one["rounds"] and two["selected"] == one["selected"]
    assert two["baseline"] == one["baseline"] and two["recipe_snippet"] == one["recipe_snippet"]
