"""ShapesWorld: procedural data, a rule-based detector, and training of the embedded ``shapes`` models.

Submodules are imported lazily by their users (``attnctl.shapes.data``, ``.detect``, ``.validate``, ``.train``)
so that ``import attnctl`` stays light.
"""
