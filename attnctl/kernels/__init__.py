"""Attention kernels: a Triton perturbed-attention kernel and its PyTorch reference.

Importing this package never imports triton: the kernel module is loaded on the first launch, so the library
works on machines without triton (use :func:`is_available` before choosing the kernel).

    from attnctl.kernels import perturbed_attention, perturbed_attention_ref, is_available
"""

from attnctl.kernels.perturbed import is_available, perturbed_attention
from attnctl.kernels.reference import perturbed_attention_ref

__all__ = ["is_available", "perturbed_attention", "perturbed_attention_ref"]
