"""One check of the ``excite`` control on a FLUX-like family's tiny pipeline, shared by the family test files."""

from attnctl.controls.excite import Excite
from attnctl.engine import apply


def check_excite_raises_the_weakest_subject(pipe, prompt: str, layer: str, call_kwargs) -> None:
    """The weakest subject's max image->text attention (A&E's loss is 1 minus it), after iterative refinement at
    step 0 and an update at step 1, against the same run with a negligible step size. ``call_kwargs()``: the
    pipeline call's keyword arguments, a fresh generator each time."""
    weakest, losses = {}, {}
    for scale in (1e-6, 20.0):
        control = Excite(subjects=[["circle", "square"]], thresholds={0: 0.99}, max_refinement_steps=5,
                         scale_factor=scale, layers=[layer], window={"start": 0.0, "stop": 0.5})
        with apply(pipe, control) as session:
            pipe(prompt=prompt, **call_kwargs())
        image = session.last_run()["controls"]["excite"]["images"][0]
        weakest[scale], losses[scale] = min(image["max_attention"].values()), image["loss"]
    assert weakest[20.0] > weakest[1e-6] + 0.1
    assert all(strong < weak for strong, weak in zip(losses[20.0], losses[1e-6]))
