"""SoftMerge: M dense experts merged per task by the SMAT router, θ_i = θ_pre + Σ_m α_m δ_m (METHOD §2.1).

Reading of METHOD §2.1's unverified note: SoftMerge appears in neither official repository; we implement the
suggested SMEAR-style baseline. It is SMAT without gates and without the sparsity terms: the same
router (prototypes under θ_pre, relaxed-Bernoulli scores, temperature schedule, logit L2), the same
first-order inner step on the support, and plain query cross-entropy as the outer loss. Distillation is off
by default (`switches.dt: false`) because METHOD §2.1 says "use plain query CE unless the paper says
otherwise"; `switches.dt: true` adds SMAT's two KD terms. Each δ_m starts at zero, so the router gets no
gradient until the experts move, as in SMAT.
"""

from __future__ import annotations

from torch import nn

from smat.methods.experts import DenseExperts, ParamLayout
from smat.methods.smat import SMAT


class SoftMerge(SMAT):
    method = "softmerge"

    @staticmethod
    def dense_experts(layout: ParamLayout, experts: int) -> nn.Module:
        return DenseExperts(layout, experts)
