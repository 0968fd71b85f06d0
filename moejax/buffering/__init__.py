"""Expert Buffering (papers.md B): every expert's weights in host memory, a few device slots per MoE layer.

Three modules, each usable alone:

- `cache`: `ExpertCache`, the bookkeeping of one layer's cache (which expert sits in which slot, who is evicted),
  pure Python. `simulate` drives it over a trace; `DeviceExpertCache` drives the same object and moves the
  weights. So the simulator and the real cache cannot disagree on a miss.
- `store`: `HostExpertStore` / `DeviceExpertCache`, the weights. Host storage is `pinned_host` memory on GPU/TPU
  (DMA-able, so `jax.device_put` to the device is an asynchronous copy) and numpy arrays on the CPU backend,
  whose memory kinds are unreliable (`host_memory_kind` is the one place that chooses); one flat row per
  expert, so a step's loads are one host -> device call. Each layer's device cache is three [slots, d, f]
  arrays, written in place (donated) inside the jitted step that computes the experts.
- `engine`: `BufferedModel` / `generate`, the model's own forward phases, run as two jitted calls per MoE layer: a piece
  that ends with the layer's attention and router, then, after the host has read the active experts (the
  one host round trip per layer), run them through the policy and started the copies of the misses, the
  experts step, which writes the copies into the slots and computes; the next piece starts with the
  combine. Output (greedy or sampled with the same key) equals `moejax.generate` with every expert resident.

Semantics of a step (shared by all of the above). A step's active experts (count > 0) are requested one at
a time in ascending id order; an expert is computed no earlier than its own request, so each layer's
requests form one sequence and the cache is an ordinary paging problem over it (which is what makes
Belady's MIN the optimum, see tests). When a step needs more experts than there are slots, they stream:
the real cache computes the experts already requested in the step (a chunk) just before one of them would
be evicted, then loads the next ones.

Policies choose the victim among resident experts other than the one requested:
  lifo    the paper's: experts inactive in the current step go first; among the group chosen, the most
          recently loaded. Experts run in ascending id order, so the expert loaded last in a step is the
          one with the highest id, requested latest in the next step too: the longest reuse distance among
          the active experts.
  lru     least recently requested (a load counts as a request).
  fifo    earliest loaded.
  lfu     fewest requests since it was loaded; ties to the least recently requested.
  belady  the offline optimum (Belady's MIN): the expert whose next request in the future trace is
          furthest away (never: infinitely far; ties to the lower id). Needs the future trace.

Prefetch (beyond the paper): the next MoE layer's router applied to the current residual stream (after the
attention of this layer, through the next layer's post-attention norm) predicts the next layer's experts;
their copies start one layer early, evicting by the same policy with the predicted set as the current step.
"""

from moejax.buffering.cache import POLICIES, Access, CacheStats, ExpertCache, check_policy, normalize_trace, simulate
from moejax.buffering.engine import (BufferedGeneration, buffered, device_bytes, expert_bytes, generate,
                                     host_memory_kind, record_trace)
from moejax.buffering.slots import Buffered, SlotState

__all__ = ["POLICIES", "Access", "Buffered", "BufferedGeneration", "CacheStats", "ExpertCache", "SlotState",
           "buffered", "check_policy", "device_bytes", "expert_bytes", "generate", "host_memory_kind",
           "normalize_trace", "record_trace", "simulate"]
