"""Layout: which device holds each expert and each token. One object, read by the capacity policy (device
capacity, the local experts of expanded drop) and by expert parallelism (where weights and tokens go).

Devices form a (data, expert) mesh. Experts sit in physical slots on the "expert" axis (a
`placement.Placement`: device d holds slots [d * L, (d + 1) * L), replicas allowed). The tokens of a
flattened batch are split over all data x expert devices in contiguous blocks, exactly as `jax.shard_map`
splits an array over `P((data, expert))`: block b sits at mesh coordinate (b // expert, b % expert), so on
the expert axis a token's device is its block index mod the expert axis size.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from moejax import placement as placement_lib

DATA, EXPERT = "data", "expert"


def make_mesh(expert: int | None = None, data: int = 1, devices=None) -> Mesh:
    """A (data, expert) mesh over `devices` (default: all); expert defaults to every device not on data."""
    devices = list(jax.devices() if devices is None else devices)
    if expert is None:
        if len(devices) % data:
            raise ValueError(f"data={data} does not divide the {len(devices)} devices")
        expert = len(devices) // data
    if expert * data != len(devices):
        raise ValueError(f"a mesh of data={data} x expert={expert} needs {expert * data} devices; "
                         f"{len(devices)} are available")
    return jax.make_mesh((data, expert), (DATA, EXPERT), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


@dataclasses.dataclass(frozen=True)
class Layout:
    """placement: the expert axis's slots. data: the data axis size (tokens are split over data x expert
    devices). mesh: the devices themselves, for expert parallelism (None: one device that only models the
    layout, as the capacity policy does); with a mesh, data and the expert axis are read from it."""

    placement: placement_lib.Placement
    data: int = 1
    mesh: Mesh | None = None

    def __post_init__(self):
        if not isinstance(self.placement, placement_lib.Placement):
            raise TypeError(f"Layout: placement must be a moejax.placement.Placement; got {self.placement!r}")
        if self.mesh is not None:
            if tuple(self.mesh.axis_names) != (DATA, EXPERT):
                raise ValueError(f"the mesh needs axes {(DATA, EXPERT)}; got {self.mesh.axis_names} (use make_mesh)")
            if self.mesh.shape[EXPERT] != self.placement.num_devices:
                raise ValueError(f"placement spans {self.placement.num_devices} devices but the mesh's expert "
                                 f"axis has {self.mesh.shape[EXPERT]}")
            object.__setattr__(self, "data", int(self.mesh.shape[DATA]))
        if isinstance(self.data, bool) or not isinstance(self.data, (int, np.integer)) or self.data < 1:
            raise ValueError(f"Layout: data={self.data!r} must be an integer >= 1")

    @classmethod
    def build(cls, num_experts: int, num_devices: int | None = None, placement=None, *, data: int = 1,
              mesh: Mesh | None = None) -> "Layout":
        """From a placement given as a Placement, as device_of_expert (E ints), or None (contiguous blocks
        of experts over `num_devices`, default: the mesh's expert axis)."""
        if num_devices is None:
            if mesh is None:
                raise ValueError("Layout.build needs num_devices or a mesh")
            num_devices = mesh.shape[EXPERT]
        if isinstance(placement, placement_lib.Placement):
            if placement.num_experts != num_experts:
                raise ValueError(f"placement covers {placement.num_experts} experts but the model has {num_experts}")
        else:
            if placement is None:
                if num_experts % num_devices:
                    raise ValueError(f"the expert axis ({num_devices} devices) does not divide the number of "
                                     f"experts ({num_experts})")
                device_of_expert = placement_lib.contiguous(num_experts, num_devices)
            else:
                device_of_expert = np.asarray(placement)
                if device_of_expert.shape != (num_experts,):
                    raise ValueError(f"placement has {device_of_expert.size} entries but the model has "
                                     f"{num_experts} experts")
            placement = placement_lib.Placement.from_device_of_expert(device_of_expert, num_devices)
        return cls(placement, data, mesh)

    @property
    def num_devices(self) -> int:
        """The expert axis's size."""
        return self.placement.num_devices

    @property
    def num_experts(self) -> int:
        return self.placement.num_experts

    @property
    def device_of_expert(self) -> np.ndarray:
        """int32 [E] (raises if some expert is replicated: then it has no single device)."""
        return self.placement.device_of_expert

    def token_devices(self, num_tokens: int) -> np.ndarray:
        """int32 [T]: the expert-axis device of each token of a flattened batch of `num_tokens`."""
        return placement_lib.token_devices(num_tokens, self.num_devices, self.data)

    def local_experts(self, num_tokens: int) -> np.ndarray:
        """int32 [T, E / D]: the experts on each token's device, ascending."""
        experts_of_device = np.argsort(self.device_of_expert, kind="stable").reshape(self.num_devices, -1)
        return experts_of_device[self.token_devices(num_tokens)].astype(np.int32)
