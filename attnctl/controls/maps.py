"""``maps``: capture per-word attention maps (image queries -> the word's text tokens).

Works on UNet cross-attention and on the image->text block of joint attention (SD3, FLUX double- and
single-stream blocks), normalised by the full softmax of each call. Only the requested token columns are
computed (``attention.key_probabilities``: query chunks, no full map kept). Maps are averaged over the selected
layers, heads and steps, each layer's map resized to the largest grid seen, and returned per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from ..errors import TokenError
from ..select import select
from .base import Control, StepWindow, StrictOptions, listify, register


class MapsOptions(StrictOptions):
    words: list[str] = Field(min_length=1, description="Words or phrases of the prompt ('cat', 'red circle', 'cat#2').")
    layers: list[str] | None = Field(None, description="Layer selectors (default: every layer with text tokens).")
    window: StepWindow = Field(default_factory=StepWindow, description="Fraction of the schedule to average over.")
    branch: str = Field("cond", description="Which rows to read: cond (default), uncond, or an extra branch.")

    _listify = field_validator("layers", mode="before")(listify)


@register
class Maps(Control):
    """Attention-map capture. After a pipeline call, ``maps`` is ``{word: tensor (n_samples, h, w)}``.

    A word missing from one sample's prompt gets no map for that sample (zeros) and is listed under
    ``missing`` in the diagnostics; the run goes on.
    """

    name = "maps"
    needs_prompt = True
    Options = MapsOptions

    def bind(self, session):
        return select(session.sites, self.options.layers, kinds=("cross", "joint", "single"))

    def on_call_start(self, session):
        self._sums: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._counts: dict[tuple[int, int], int] = {}
        self.maps: dict[str, torch.Tensor] = {}
        self._missing: set[tuple[str, str]] = set()

    def on_attention(self, call):
        opts = self.options
        if not opts.window.contains(call.step.progress) or not call.layout.has(opts.branch):
            return
        rows = call.layout.rows(opts.branch)
        samples = [call.layout.samples[r] for r in rows]
        wanted = {}
        for s in samples:
            for w in opts.words:
                try:
                    wanted[(s, w)] = call.text_positions(s, w)
                except TokenError:  # a word absent from this sample's prompt: no map for it, reported
                    self._missing.add((call.session.prompt_of(s), w))
        if not wanted:
            return
        columns = sorted({p for positions in wanted.values() for p in positions})
        heads = list(call.heads) if call.heads is not None else None
        rows_t = torch.tensor(rows)

        def collect(probs: torch.Tensor) -> None:  # probs: (B, H, Sq, len(columns)) for the requested keys
            probs = probs[rows_t][:, :, call.image]
            if heads is not None:
                probs = probs[:, heads]
            probs = probs.mean(dim=1).float()  # (rows, S_image, columns)
            h, w = call.grid
            sums = self._sums.setdefault((h, w), {})
            for i, sample in enumerate(samples):
                for word in opts.words:
                    if (sample, word) not in wanted:
                        continue
                    index = [columns.index(p) for p in wanted[(sample, word)]]
                    grid = probs[i, :, index].sum(dim=-1).reshape(h, w)
                    store = sums.setdefault(word, torch.zeros(call.layout.n_samples, h, w))
                    if store.shape[0] <= sample:
                        store = torch.cat([store, torch.zeros(sample + 1 - store.shape[0], h, w)])
                        sums[word] = store
                    store[sample] += grid.detach().cpu()
            self._counts[(h, w)] = self._counts.get((h, w), 0) + 1

        # Restrict the work to the rows we read: q of other rows is never multiplied.
        call.capture(columns, collect)

    def on_call_end(self, session):
        missing = [{"prompt": p, "word": w} for p, w in sorted(self._missing)]
        if not self._counts:
            return {"missing": missing} if missing else {}
        target = max(self._counts, key=lambda hw: hw[0] * hw[1])
        total = sum(self._counts.values())
        for word in self.options.words:
            acc = None
            for hw, sums in self._sums.items():
                if word not in sums:
                    continue
                m = sums[word]
                if hw != target:
                    m = F.interpolate(m[:, None], size=target, mode="bilinear", align_corners=False)[:, 0]
                acc = m if acc is None else acc + m
            if acc is not None:
                self.maps[word] = acc / total
        return {"grid": list(target), "layer_calls": total, "missing": missing,
                "peak": {w: [round(float(v), 4) for v in m.flatten(1).max(dim=1).values] for w, m in self.maps.items()}}
