"""Expert placement: which device of the expert mesh axis holds each expert (papers.md B, load balancing).

A placement is a plain int array `device_of_expert` [E]; every device holds E / D experts. The same
placement tells capacity policies which experts are local to a token and lays out weights under expert
parallelism.
"""

from __future__ import annotations

import numpy as np


def check(device_of_expert, num_devices: int) -> np.ndarray:
    """Validate a placement: ids in [0, D) and E / D experts on every device."""
    placement = np.asarray(device_of_expert)
    if placement.ndim != 1 or not np.issubdtype(placement.dtype, np.integer):
        raise ValueError(f"a placement is an int array [num_experts]; got {placement!r}")
    if num_devices < 1 or placement.size % num_devices:
        raise ValueError(f"num_devices={num_devices} must divide the number of experts ({placement.size})")
    if placement.min() < 0 or placement.max() >= num_devices:
        raise ValueError(f"placement {placement.tolist()} names devices outside [0, {num_devices})")
    counts = np.bincount(placement, minlength=num_devices)
    if (counts != placement.size // num_devices).any():
        raise ValueError(f"placement {placement.tolist()} puts {counts.tolist()} experts on the devices; each "
                         f"must hold {placement.size // num_devices}")
    return placement.astype(np.int32)


def contiguous(num_experts: int, num_devices: int) -> np.ndarray:
    """Experts in contiguous blocks: device d holds experts [d * E/D, (d + 1) * E/D). The default."""
    if num_devices < 1 or num_experts % num_devices:
        raise ValueError(f"num_devices={num_devices} must divide num_experts={num_experts}")
    return np.repeat(np.arange(num_devices, dtype=np.int32), num_experts // num_devices)


def greedy(mean_loads, num_devices: int) -> np.ndarray:
    """papers.md B: experts by mean load, largest first, each to the device with the smallest summed load
    among those holding fewer than E / D experts (ties: lower expert id first, then lower device id)."""
    loads = np.asarray(mean_loads, np.float64)
    num_experts = loads.size
    per_device = contiguous(num_experts, num_devices).size // num_devices  # validates the division
    placement = np.full(num_experts, -1, np.int32)
    device_load = np.zeros(num_devices)
    device_count = np.zeros(num_devices, np.int64)
    for expert in np.argsort(-loads, kind="stable"):
        open_devices = np.flatnonzero(device_count < per_device)
        device = open_devices[np.argmin(device_load[open_devices])]
        placement[expert] = device
        device_load[device] += loads[expert]
        device_count[device] += 1
    return placement


def token_devices(num_tokens: int, num_devices: int) -> np.ndarray:
    """The device each token of a flattened batch sits on when tokens are sharded in contiguous blocks of
    ceil(T / D) (the expert-parallel layout, which pads T up to a multiple of D)."""
    return (np.arange(num_tokens) // -(-num_tokens // num_devices)).astype(np.int32)
