"""The MoE runtime: the one frozen object that says how a MoE block computes (policy, experts backend,
layout). A model holds one per MoE block; functions return a new model with another (`with_runtime`,
`with_policy`, `moejax.parallel.expert_parallel`), never mutate a caller's."""

from __future__ import annotations

import dataclasses

import numpy as np

from moejax import experts as experts_lib
from moejax.capacity import MoEPolicy
from moejax.layout import Layout


@dataclasses.dataclass(frozen=True)
class MoERuntime:
    """policy: who is computed (capacity-aware drop). experts: how (an experts backend). layout: where each
    expert and token sits, read by both; None on one device whose policy needs no devices (a policy's
    num_devices / placement build it, see `resolve`)."""

    policy: MoEPolicy = MoEPolicy()
    experts: object = experts_lib.Resident()
    layout: Layout | None = None

    def __post_init__(self):
        if not isinstance(self.policy, MoEPolicy):
            raise TypeError(f"policy must be a moejax.MoEPolicy; got {type(self.policy).__name__}")
        object.__setattr__(self, "experts", experts_lib.backend(self.experts))
        if self.layout is not None and not isinstance(self.layout, Layout):
            raise TypeError(f"layout must be a moejax.layout.Layout; got {self.layout!r}")
        if self.policy.needs_layout and self.layout is None and self.policy.num_devices is None:
            raise ValueError(f"MoEPolicy: expanded={self.policy.expanded!r}, scope={self.policy.scope!r} needs a "
                             "placement that says which experts are on which device: pass num_devices= "
                             "(contiguous blocks) or placement= to the policy, or run the model expert-parallel")
        why_not = self.experts.supported(self.layout)
        if why_not:
            raise ValueError(f"experts backend {self.experts!r} cannot run here: {why_not}")

    @property
    def sharded(self) -> bool:
        """The experts are sharded over a mesh (their weights are in physical order)."""
        return self.layout is not None and self.layout.mesh is not None

    def layout_for(self, num_experts: int) -> Layout | None:
        """The layout a block of `num_experts` computes with: the runtime's own, else the one its policy's
        num_devices / placement describe; checked that the two agree where both say one."""
        own = self.policy.layout(num_experts)
        if self.layout is None:
            return own
        if self.layout.num_experts != num_experts:
            raise ValueError(f"the layout places {self.layout.num_experts} experts; the block has {num_experts}")
        if own is not None and (own.num_devices != self.layout.num_devices or (
                self.policy.placement is not None and not self.layout.placement.is_replicated
                and not np.array_equal(own.device_of_expert, self.layout.device_of_expert))):
            raise ValueError(f"the policy's placement (num_devices={self.policy.num_devices}, placement="
                             f"{self.policy.placement}) disagrees with the model's layout ({self.layout.num_devices} "
                             "devices): give the placement once, to expert_parallel or to the policy")
        return self.layout
