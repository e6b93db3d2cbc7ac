"""Two clients at once, with different controls and the same seed, get exactly what each gets alone."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

REQUESTS = {
    "plain": dict(prompt="a red circle and a blue square", steps=4, seeds="7"),
    "dimmed": dict(prompt="a red circle and a blue square", steps=4, seeds="7", toy_dim__enabled=True,
                   toy_dim__strength=3.0, maps__enabled=True, maps__words="square"),
}


def image_of(client, request) -> np.ndarray:
    images, maps, *_ = client.predict(api_name="/generate", **request)
    assert len(maps) == (1 if request.get("maps__enabled") else 0)
    return np.asarray(Image.open(images[0]["image"]).convert("RGB"))


def test_two_concurrent_clients_get_what_they_get_alone(served):
    from gradio_client import Client

    clients = {name: Client(served, verbose=False) for name in REQUESTS}
    alone = {name: image_of(clients[name], request) for name, request in REQUESTS.items()}
    assert not np.array_equal(alone["plain"], alone["dimmed"])  # the controls differ in effect
    order = ["plain", "dimmed", "plain", "dimmed"]
    with ThreadPoolExecutor(len(order)) as pool:
        together = list(pool.map(lambda name: image_of(clients[name], REQUESTS[name]), order))
    for name, image in zip(order, together):
        assert np.array_equal(image, alone[name]), name
