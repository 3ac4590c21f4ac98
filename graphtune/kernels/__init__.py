"""graphtune's Triton kernels, each a ``torch.library`` custom op in the ``graphtune`` namespace.

Importing this package registers ``graphtune::rms_norm``, ``graphtune::rope``, ``graphtune::swiglu``
and ``graphtune::geglu`` (Triton) and ``graphtune::lora_linear`` with their ``*_backward`` ops, and
``graphtune::attention`` / ``graphtune::document_ids`` (see ``attention.py``); passes call them through
``torch.ops.graphtune``.
The submodules are exported as modules (``graphtune.kernels.rms_norm.rms_norm`` is the function), so
that ``import graphtune.kernels.rms_norm as m`` gives the module and not a same-named function.
"""

from graphtune.kernels import attention, geglu, lora_linear, rms_norm, rope, swiglu
from graphtune.kernels import dequant_4bit, lora_linear_4bit  # QLoRA: graphtune::lora_linear_4bit
from graphtune.kernels import linear_cross_entropy
from graphtune.kernels import lora_group, lora_mlp

__all__ = ["attention", "geglu", "lora_linear", "rms_norm", "rope", "swiglu"]
