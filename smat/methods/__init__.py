"""Few-shot models: Pre, PMF, SoftMerge and SMAT behind one interface (`FewShotModel`).

One module per concept: hard-concrete gates (`gates`), the expert reparameterisation (`experts`), the router
hypernetwork (`router`), the cosine prototype head (`head`), the dense teacher and distillation (`teacher`),
the sparsity constraint (`sparsity`), and one module per method. `checkpoint.load_model` loads any of them.
"""

from smat.methods.base import FewShotModel, TaskParams
from smat.methods.checkpoint import load_model
from smat.methods.registry import build_model

__all__ = ["FewShotModel", "TaskParams", "build_model", "load_model"]
