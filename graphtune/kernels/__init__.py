"""graphtune's Triton kernels, each a ``torch.library`` custom op in the ``graphtune`` namespace.

Importing this package registers ``graphtune::rms_norm``, ``graphtune::rope``, ``graphtune::swiglu``
and ``graphtune::geglu`` (Triton) and ``graphtune::lora_linear`` with their ``*_backward`` ops; passes call them through ``torch.ops.graphtune``.
The submodules are exported as modules (``graphtune.kernels.rms_norm.rms_norm`` is the function), so
that ``import graphtune.kernels.rms_norm as m`` gives the module and not a same-named function.
"""

from graphtune.kernels import geglu, lora_linear, rms_norm, rope, swiglu

__all__ = ["geglu", "lora_linear", "rms_norm", "rope", "swiglu"]
