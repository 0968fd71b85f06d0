"""The MoE block, in public phases: route -> apply_policy -> experts -> combine.

Modules only hold parameters; the math lives in routing / capacity / the experts backends. How the block
computes (policy, experts backend, layout) is its frozen `runtime`, replaced only by functions that return
a new model (moejax.models.with_runtime / with_policy, moejax.parallel.expert_parallel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import capacity, routing
from moejax import stats as stats_lib
from moejax.config import ACTIVATIONS, ModelConfig
from moejax.experts import ExpertsOutput, ExpertWeights
from moejax.kernels import ClampedSwiGLU, SplitExperts
from moejax.models.layers import MLP, param
from moejax.runtime import MoERuntime


# How a block holds its routed experts: "stacked", each weight one [E, ...] array (what every experts backend,
# checkpoint and expert-parallel layout takes), or "split", each expert's weights arrays of their own, which
# the CPU's "xla" experts step reads in place (a stacked expert is copied before its dots read it; see
# kernels.SplitExperts): faster decode on the CPU, at a compile time growing with the number of experts.
EXPERT_STORAGES = ("stacked", "split")
# the block's attributes holding the routed experts, in ExpertWeights' field order
EXPERT_FIELDS = ("w_gate", "w_up", "w_down", "gate_bias", "up_bias", "down_bias")


def check_expert_storage(storage) -> None:
    if storage not in EXPERT_STORAGES:
        raise ValueError(f"unknown expert_storage {storage!r}; supported: {EXPERT_STORAGES}")


class MoEBlock(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, runtime: MoERuntime, *, dtype, rngs: nnx.Rngs):
        c = config
        e, d, f = c.num_experts, c.hidden_size, c.moe_intermediate_size
        self.router = param(rngs, (d, e), dtype)
        self.router_bias = nnx.Param(jnp.zeros((e,), dtype)) if c.router_bias else None  # GPT-OSS
        # the routed experts as kernels.ExpertWeights describes them: gated or not, biases or not
        self.w_gate = param(rngs, (e, d, f), dtype) if c.moe_gated else None
        self.w_up = param(rngs, (e, d, f), dtype)
        self.w_down = param(rngs, (e, f, d), dtype)
        self.gate_bias = param(rngs, (e, f), dtype) if c.moe_bias and c.moe_gated else None
        self.up_bias = param(rngs, (e, f), dtype) if c.moe_bias else None
        self.down_bias = param(rngs, (e, d), dtype) if c.moe_bias else None
        self.shared = (MLP(d, c.shared_expert_intermediate_size, c.hidden_act, dtype=dtype, rngs=rngs)
                       if c.shared_expert_intermediate_size else None)
        self.shared_gate = param(rngs, (d, 1), dtype) if c.shared_expert_gate else None
        # noaux_tc (DeepSeek-V3, GLM-4.5): the learned e_score_correction_bias the choice adds to the scores;
        # float32 whatever the model's dtype, as transformers keeps it (bf16 would move the choice)
        self.score_bias = nnx.Param(jnp.zeros((e,), jnp.float32)) if c.topk_method == "noaux_tc" else None
        self.config = config
        self.layer = layer
        runtime.layout_for(e)  # fails here, not at the first call, if the layout cannot serve this block
        self.runtime = runtime
        # a stateful experts backend's state (e.g. buffered experts' slots), set by whoever installs it:
        # an nnx Variable, so decode loops carry it from step to step; and constant extra weights it reads
        self.expert_state = nnx.data(None)
        self.extra_weights = nnx.data(None)

    @property
    def policy(self) -> capacity.MoEPolicy:
        return self.runtime.policy

    @property
    def layout(self):
        return self.runtime.layout_for(self.config.num_experts)

    def route(self, h: jax.Array, token_mask: jax.Array) -> routing.Routing:
        """The router on h [N, d]: Routing with the logits; padding tokens (token_mask False) keep nothing."""
        c = self.config
        logits = h.astype(jnp.float32) @ self.router[...].astype(jnp.float32)
        if self.router_bias is not None:
            logits = logits + self.router_bias[...].astype(jnp.float32)
        return routing.route(logits, c.num_experts_per_tok, norm_topk_prob=c.norm_topk_prob,
                             topk_method=c.topk_method, n_group=c.n_group, topk_group=c.topk_group,
                             routed_scaling_factor=c.routed_scaling_factor, scoring_func=c.scoring_func,
                             score_bias=None if self.score_bias is None else self.score_bias[...],
                             token_mask=token_mask, jitter_eps=c.router_jitter_eps)

    def apply_policy(self, r: routing.Routing, token_mask: jax.Array, decode: bool = False) -> routing.Routing:
        """The runtime's capacity policy over the runtime's layout (decode: a decode step), renormalising the
        kept weights as the policy says for this family (its norm_topk_prob and routed_scaling_factor)."""
        c = self.config
        key = capacity.drop_key(self.policy, self.layer, r.logits, token_mask)
        return capacity.apply_policy(r, self.policy, num_tokens=token_mask.sum(), decode=decode, key=key,
                                     layout=self.layout, norm_topk_prob=c.norm_topk_prob,
                                     routed_scaling_factor=c.routed_scaling_factor)

    def expert_variables(self) -> ExpertWeights:
        """The routed experts' stacked parameters (nnx.Param, None where the FFN has no such weight), for code
        that moves or replaces them (expert parallelism, buffering): iterate the fields that are not None."""
        self.require_stacked_experts("moving or replacing the experts' parameters")
        return self._expert_fields()

    def _expert_fields(self) -> ExpertWeights:
        """Each field's nnx.Param (stacked) or nnx.List of one nnx.Param per expert (split), or None."""
        return ExpertWeights(*(getattr(self, name) for name in EXPERT_FIELDS))

    def expert_weights(self) -> ExpertWeights | SplitExperts:
        """The routed experts' arrays as the experts backend takes them: stacked ExpertWeights, or SplitExperts
        where the block holds them split."""
        fields = self._expert_fields()
        if self.expert_storage == "stacked":
            return ExpertWeights(*(None if v is None else v[...] for v in fields))
        return SplitExperts(tuple(ExpertWeights(*(None if v is None else v[e][...] for v in fields))
                                  for e in range(len(fields.up))))  # expert-parallel: the local slots

    @property
    def expert_storage(self) -> str:
        """How the block holds its routed experts (EXPERT_STORAGES)."""
        return "split" if isinstance(self.w_up, nnx.List) else "stacked"

    def hold_experts(self, storage: str) -> None:
        """Hold the routed experts as `storage` (EXPERT_STORAGES), in place: only for a block nobody else holds
        (moejax.models.with_expert_storage's new model, a loader's own). One field at a time, the old arrays
        let go before the next field is converted, so at most one field is held twice."""
        check_expert_storage(storage)
        if storage == self.expert_storage:
            return
        if self.runtime.sharded:  # its experts are permuted and sharded; expert_parallel keeps the storage
            raise ValueError(f"layer {self.layer} is expert-parallel: choose the expert storage before "
                             "moejax.parallel.expert_parallel, which keeps the model's")
        if storage == "split" and self.stateful:
            raise ValueError(f"layer {self.layer} runs experts backend {self.runtime.experts!r}, which takes stacked "
                             "experts; split experts are for a model resident on one device")
        for name in EXPERT_FIELDS:
            if getattr(self, name) is not None:
                setattr(self, name, _held_as(getattr(self, name), storage))

    def require_stacked_experts(self, needs: str) -> None:
        """A clear refusal where `needs` (expert parallelism, buffering, ...) takes the experts stacked."""
        if self.expert_storage != "stacked":
            raise ValueError(f"{needs} needs the routed experts stacked; layer {self.layer} holds each expert's "
                             "weights split (expert_storage='split'): pass the model through "
                             "moejax.with_expert_storage(model, 'stacked') first")

    @property
    def activation(self):
        """The experts' activation, hashable (part of the compiled program): GPT-OSS's clamped SwiGLU, or the
        kernels' name of hidden_act."""
        c = self.config
        return ACTIVATIONS[c.hidden_act] if c.swiglu_limit is None else ClampedSwiGLU(c.swiglu_limit)

    @property
    def stateful(self) -> bool:
        return getattr(self.runtime.experts, "stateful", False)

    def _backend_weights(self):
        if self.extra_weights is None:
            return self.expert_weights(), None
        return self.expert_weights(), self.extra_weights.get_value()

    def experts(self, h: jax.Array, r: routing.Routing) -> ExpertsOutput:
        """The routed experts through the runtime's backend (a stateful one updates self.expert_state)."""
        activation = self.activation
        if self.config.moe_scales_input:
            h, r = scaled_input(h, r)
        if not self.stateful:
            return self.runtime.experts(h, r, self.expert_weights(), self.layout, activation)
        out, state = self.runtime.experts(h, r, self._backend_weights(), self.layout, activation,
                                          self.expert_state.get_value())
        self.expert_state.set_value(state)
        return out

    @property
    def prefetches(self) -> bool:
        """Whether the backend wants this block's experts predicted one MoE layer early (see prefetch)."""
        return self.stateful and getattr(self.runtime.experts, "prefetch", False)

    def prefetch(self, h: jax.Array, token_mask: jax.Array, decode: bool = False) -> None:
        """Predict this block's experts from h [N, d] (the previous MoE layer's residual stream through this
        layer's own norm) and let the backend start loading them."""
        counts = stats_lib.expert_counts(self.apply_policy(self.route(h, token_mask), token_mask, decode))
        self.expert_state.set_value(self.runtime.experts.prefetch_step(self.expert_state.get_value(), counts > 0,
                                                                       self._backend_weights()))

    def combine(self, h: jax.Array, routed: jax.Array) -> jax.Array:
        """The routed experts' combined output [N, d] plus the shared experts of h [N, d]."""
        if self.shared is None:
            return routed
        shared = self.shared(h)
        if self.shared_gate is not None:
            shared = jax.nn.sigmoid(h @ self.shared_gate[...]) * shared
        return routed + shared

    def __call__(self, h: jax.Array, token_mask: jax.Array, decode: bool = False):
        """h [N, d], token_mask bool [N] -> ([N, d], Routing with keep = the pairs computed, needed bucket)."""
        r = self.apply_policy(self.route(h, token_mask), token_mask, decode)
        out = self.experts(h, r)
        return self.combine(h, out.out), r._replace(keep=out.kept), out.needed


def scaled_input(h: jax.Array, r: routing.Routing) -> tuple[jax.Array, routing.Routing]:
    """Llama 4's routing, for every experts backend: the token times its router score goes into its expert,
    whose output joins with weight 1. Exact for one expert per token, the only routing it is computed for."""
    if r.experts.shape[-1] != 1:
        raise ValueError(f"this router scales the expert's input (Llama 4), computed for one expert per token; "
                         f"the routing has {r.experts.shape[-1]} per token (expanded drop adds the local experts)")
    return (h * r.weights.astype(h.dtype)).astype(h.dtype), r._replace(weights=jnp.ones_like(r.weights))


def _held_as(variable, storage: str):
    """One expert field held as `storage`: a stacked nnx.Param split into an nnx.List of one nnx.Param per
    expert (copies), or such a list stacked into one nnx.Param."""
    if storage == "split":
        whole = variable[...]
        return nnx.List([nnx.Param(whole[e]) for e in range(whole.shape[0])])
    return nnx.Param(jnp.stack([p[...] for p in variable]))
