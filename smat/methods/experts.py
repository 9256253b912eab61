"""How task weights are parameterised on top of the frozen θ_pre (METHOD §1.2, §1.5, §2.1-2.2).

All backbone tensors are handled as one flat vector of length N (`ParamLayout`), so that merging M experts
is one matrix product instead of M × (number of tensors) small operations. Storage:

* `SparseInterpolatedExperts` (SMAT): shared dense δ of shape (N,), zeros; gate log-α of shape (M, N),
  i.e. row m is expert m's gates for every backbone entry, in `ParamLayout` order (METHOD §1.2's per-parameter
  `(*p.shape, M)` tensors, transposed and concatenated). Update = (Σ_m α_m z_m) ⊙ δ.
* `DenseDelta` (MLS and IE off): update = δ.
* `DenseExperts` (SoftMerge): M dense deltas of shape (M, N), zeros; update = Σ_m α_m δ_m.

Every backbone tensor is gated, embeddings, LayerNorms and biases included. Our backbones have no
classifier, so METHOD §1.2's always-on head placeholder has no counterpart here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from smat.methods.gates import HardConcrete


class ParamLayout:
    """Names, shapes and offsets of a set of tensors laid out one after another in a flat vector."""

    def __init__(self, params: dict[str, Tensor]) -> None:
        self.names = list(params)
        self.shapes = [tuple(p.shape) for p in params.values()]
        self.numels = [p.numel() for p in params.values()]
        self.size = sum(self.numels)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of `flat` (..., N) as a dict of (..., *shape) tensors."""
        lead = flat.shape[:-1]
        chunks = torch.split(flat, self.numels, dim=-1)
        return {name: chunk.reshape(*lead, *shape) for name, chunk, shape in zip(self.names, chunks, self.shapes)}

    def flatten(self, tensors: dict[str, Tensor]) -> Tensor:
        return torch.cat([tensors[name].reshape(-1) for name in self.names])


def _fp32(device: torch.device):
    """Merging runs in fp32 even under fp16 autocast: δ is small and the gates need their full precision."""
    return torch.autocast(device_type=device.type, enabled=False)


class SparseInterpolatedExperts(nn.Module):
    """SMAT's experts: θ_pre + z_m ⊙ δ, merged as θ_pre + (Σ_m α_m z_m) ⊙ δ."""

    has_gates = True

    def __init__(self, layout: ParamLayout, n_experts: int, gates: HardConcrete,
                 init_mean: float = 0.0, init_std: float = 0.5) -> None:
        super().__init__()
        self.layout = layout
        self.n_experts = n_experts
        self.hard_concrete = gates
        self.delta = nn.Parameter(torch.zeros(layout.size))
        self.log_alpha = nn.Parameter(torch.empty(n_experts, layout.size).normal_(init_mean, init_std))
        self._eval_gates: tuple[tuple, Tensor] | None = None

    def gates(self, training: bool) -> Tensor:
        """(M, N) gate values. Training clamps log α in place first (METHOD §1.3); eval reads a clamped copy,
        so that inference never modifies the model."""
        if training:
            self.hard_concrete.clamp_(self.log_alpha)
            return self.hard_concrete.sample(self.log_alpha, training=True)
        # Eval gates are deterministic: computed once per state of log α (its version counts in-place
        # updates), they cost a fifth of an evaluation episode otherwise.
        key = (self.log_alpha.data_ptr(), self.log_alpha._version, self.log_alpha.device)
        if self._eval_gates is None or self._eval_gates[0] != key:
            g = self.hard_concrete
            with torch.no_grad():
                gates = g.sample(self.log_alpha.detach().clamp(g.log_alpha_min, g.log_alpha_max), training=False)
            self._eval_gates = (key, gates)
        return self._eval_gates[1]

    def update(self, alpha: Tensor, gates: Tensor) -> Tensor:
        with _fp32(self.delta.device):
            return (alpha.float() @ gates) * self.delta

    def expert_masks(self) -> dict[str, Tensor]:
        """Eval-mode gate > 0 per backbone tensor, bool (M, *shape)."""
        with torch.no_grad():
            return self.layout.unflatten(self.gates(training=False) > 0)


class DenseDelta(nn.Module):
    """One dense update: θ_pre + δ (Table 2 row 5)."""

    has_gates = False

    def __init__(self, layout: ParamLayout) -> None:
        super().__init__()
        self.layout = layout
        self.n_experts = 1
        self.delta = nn.Parameter(torch.zeros(layout.size))

    def update(self, alpha: Tensor, gates: None = None) -> Tensor:
        return self.delta


class DenseExperts(nn.Module):
    """M dense experts merged by the router: θ_pre + Σ_m α_m δ_m (SoftMerge)."""

    has_gates = False

    def __init__(self, layout: ParamLayout, n_experts: int) -> None:
        super().__init__()
        self.layout = layout
        self.n_experts = n_experts
        self.delta = nn.Parameter(torch.zeros(n_experts, layout.size))

    def update(self, alpha: Tensor, gates: None = None) -> Tensor:
        with _fp32(self.delta.device):
            return alpha.float() @ self.delta
