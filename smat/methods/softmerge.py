"""SoftMerge: M dense experts merged per task by the SMAT router, θ_i = θ_pre + Σ_m α_m δ_m (spec §2.1).

Reading of the spec's [UNVERIFIED] note: SoftMerge appears in neither official repository; we implement the
spec's suggested SMEAR-style baseline. It is SMAT without gates and without the sparsity terms: the same
router (prototypes under θ_pre, relaxed-Bernoulli scores, temperature schedule, logit L2), the same
first-order inner step on the support, and plain query cross-entropy as the outer loss. Distillation is off
by default (`switches.dt: false`) because the spec says "use plain query CE unless the paper says
otherwise"; `switches.dt: true` adds SMAT's two KD terms. Each δ_m starts at zero, so the router gets no
gradient until the experts move, as in SMAT.
"""

from __future__ import annotations

from smat.methods.smat import SMAT


class SoftMerge(SMAT):
    method = "softmerge"
