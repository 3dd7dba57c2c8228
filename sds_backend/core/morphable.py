"""The morphable model as tensors on one device, for the fit loop and the renderer.

The bundle itself (fields, checks, files) is `sds_backend.bundle`; this is its torch view:
vertices(weights) = mean + weights . basis, batched and differentiable in the weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..bundle import Bundle


@dataclass(frozen=True)
class MorphableTensors:
    mean: torch.Tensor    # [V, 3]
    basis: torch.Tensor   # [K, V*3]
    faces: torch.Tensor   # int64 [F, 3]

    @classmethod
    def from_bundle(cls, bundle: Bundle, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> "MorphableTensors":
        return cls(mean=torch.as_tensor(bundle.mean, device=device, dtype=dtype),
                   basis=torch.as_tensor(bundle.basis.reshape(bundle.num_components, -1), device=device, dtype=dtype),
                   faces=torch.as_tensor(bundle.faces, device=device, dtype=torch.int64))

    @property
    def num_components(self) -> int:
        return int(self.basis.shape[0])

    def vertices(self, weights: torch.Tensor) -> torch.Tensor:
        """weights [..., K] -> vertices [..., V, 3] in the basis' dtype; differentiable in the weights."""
        if weights.shape[-1] != self.num_components:
            raise ValueError(f"weights: expected last dimension K={self.num_components}, got shape {tuple(weights.shape)}")
        offsets = weights.to(self.basis.dtype) @ self.basis
        return self.mean + offsets.reshape(*weights.shape[:-1], -1, 3)
