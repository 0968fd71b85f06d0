"""Training a small MoE language model: loss with router auxiliaries, an AdamW step, data parallelism,
orbax checkpoints that resume exactly.

The loss runs the model's own layers, as CausalLM.forward does, so that it can also see each MoE layer's
router logits: the router z-loss needs logsumexp(logits), which the softmax scores in `Routing` no longer
carry. Attention, routing and dispatch are the inference code itself.

The experts step differs. Inference is dropless, but on the CPU its fast path (a dynamic loop) cannot be
differentiated, and the differentiable jax.lax.ragged_dot is about 10x slower there, forward and backward.
Training therefore uses Switch/GShard capacity buffers by default: each expert computes at most
`capacity_factor * T * k / E` of its pairs in one dense batched matmul; the pairs past that pass through the
residual only, in training only. Under the load-balancing loss they are few: at factor 2, 0.15% of the
default model's pairs in its first layer and none in the others, on 16 x 256-token training batches.
capacity_factor=0 trains dropless with ragged_dot.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import capacity, dispatch, kernels
from moejax.config import ACTIVATIONS, ModelConfig
from moejax.models.rope import rope_angles
from moejax.models.transformer import CausalLM, MoEBlock

# jax.lax.ragged_dot is reverse-differentiable; the CPU's default "xla" experts path (a dynamic loop) is not.
DROPLESS_IMPLEMENTATION = "ragged_dot"


@dataclasses.dataclass(frozen=True)
class LossWeights:
    load_balance: float = 0.01  # Switch Transformer auxiliary loss coefficient
    router_z: float = 0.001  # ST-MoE router z-loss coefficient


class LossTerms(NamedTuple):
    total: jax.Array
    cross_entropy: jax.Array  # mean over predicted tokens
    load_balance: jax.Array  # mean over MoE layers; 1.0 when perfectly balanced
    router_z: jax.Array  # mean over MoE layers


def prepare_for_training(model: CausalLM) -> CausalLM:
    """Switch every MoE block to a differentiable experts implementation (in place; returns the model)."""
    for block in model.moe_blocks():
        block.implementation = DROPLESS_IMPLEMENTATION
    return model


def capacity_buffer_ffn(rows: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                        w_down: jax.Array, capacity: int, activation: str = "silu") -> jax.Array:
    """grouped_ffn's semantics for the first `capacity` rows of each group (later rows -> 0), as dense
    [E, capacity, d] buffers: differentiable, and fast on every backend.

    rows [N, d] sorted by group, group_sizes int [E]; rows past sum(group_sizes) are padding (-> 0)."""
    n = rows.shape[0]
    num_groups = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    slot = jnp.arange(capacity)
    index = jnp.minimum(starts[:, None] + slot[None, :], n - 1)  # [E, C]: the row in each buffer slot
    filled = slot[None, :] < group_sizes[:, None]
    buffers = jnp.where(filled[..., None], rows[index], 0).astype(rows.dtype)
    act = kernels.ACTIVATIONS[activation]
    hidden = act(jnp.einsum("ecd,edf->ecf", buffers, w_gate)) * jnp.einsum("ecd,edf->ecf", buffers, w_up)
    out = jnp.einsum("ecf,efd->ecd", hidden.astype(rows.dtype), w_down)
    # back to row order: row r of group g sits in slot r - starts[g]
    group = jnp.minimum(jnp.searchsorted(ends, jnp.arange(n), side="right"), num_groups - 1)
    rank = jnp.arange(n) - starts[group]
    computed = (rank < capacity) & (jnp.arange(n) < ends[-1])
    return jnp.where(computed[:, None], out[group, jnp.minimum(rank, capacity - 1)], 0).astype(rows.dtype)


def _moe_block(block: MoEBlock, x: jax.Array, token_mask: jax.Array, capacity_factor: float):
    """MoEBlock.__call__ on one device with the training experts step -> (out [N, d], Routing)."""
    c = block.config
    r = block.route(x, token_mask, decode=False)
    sent = dispatch.dispatch(x, r)
    activation = ACTIVATIONS[c.hidden_act]
    weights = (block.w_gate[...], block.w_up[...], block.w_down[...])
    if capacity_factor > 0:
        cap = capacity.expert_capacity(x.shape[0], c.num_experts_per_tok, c.num_experts, capacity_factor)
        expert_out = capacity_buffer_ffn(sent.rows, sent.group_sizes, *weights, capacity=cap, activation=activation)
    else:
        expert_out = kernels.grouped_ffn(sent.rows, sent.group_sizes, *weights, activation=activation,
                                         implementation=DROPLESS_IMPLEMENTATION)
    out = dispatch.combine(expert_out, sent, r)
    if block.shared is not None:
        shared = block.shared(x)
        if block.shared_gate is not None:
            shared = jax.nn.sigmoid(x @ block.shared_gate[...]) * shared
        out = out + shared
    return out, r


def load_balance_loss(router_probs: jax.Array, experts: jax.Array, token_mask: jax.Array) -> jax.Array:
    """Switch Transformer: E * sum_e f_e * P_e over real tokens; f_e the fraction of (token, expert)
    pairs routed to e, P_e the mean router probability of e. 1.0 for a perfectly uniform router."""
    num_experts = router_probs.shape[-1]
    weight = token_mask.astype(jnp.float32)
    count = jnp.maximum(weight.sum(), 1.0)
    routed = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32).sum(axis=1)  # [T, E]
    fraction = (routed * weight[:, None]).sum(0) / (count * experts.shape[1])
    mean_prob = (router_probs * weight[:, None]).sum(0) / count
    return num_experts * jnp.sum(fraction * mean_prob)


def router_z_loss(router_logits: jax.Array, token_mask: jax.Array) -> jax.Array:
    """ST-MoE: mean over real tokens of logsumexp(router logits)^2 (keeps router logits small)."""
    z = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)
    weight = token_mask.astype(jnp.float32)
    return (z * z * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def loss_terms(model: CausalLM, tokens: jax.Array, token_mask: jax.Array, weights: LossWeights,
               capacity_factor: float = 2.0) -> LossTerms:
    """Next-token cross-entropy of tokens [B, T+1] (inputs tokens[:, :-1], targets tokens[:, 1:]) plus the
    weighted router auxiliaries; positions whose input or target is padding are excluded. capacity_factor:
    of the training experts step (module docstring); 0 for dropless."""
    c = model.config
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    input_mask = token_mask[:, :-1]
    b, t = inputs.shape
    # The no-cache path of CausalLM.forward, with the router logits kept.
    positions = jnp.maximum(jnp.cumsum(input_mask, axis=1) - 1, 0).astype(jnp.int32)
    inv_freq, attention_factor = model._rope
    cos, sin = rope_angles(positions, jnp.asarray(inv_freq, jnp.float32), attention_factor)
    slots = jnp.arange(t)
    allowed = input_mask[:, None, :] & (slots[None, None, :] <= slots[None, :, None])
    if c.sliding_window:
        allowed &= positions[:, :, None] - positions[:, None, :] < c.sliding_window
    x = model.embed_tokens[...][inputs]
    flat_mask = input_mask.reshape(b * t)
    balance, z_loss, moe_layers = 0.0, 0.0, 0
    for layer in model.layers:
        attn_out, _ = layer.self_attn(layer.input_layernorm(x), cos, sin, allowed, None, 0)
        x = x + attn_out
        h = layer.post_attention_layernorm(x)
        if isinstance(layer.mlp, MoEBlock):
            flat = h.reshape(b * t, -1)
            out, r = _moe_block(layer.mlp, flat, flat_mask, capacity_factor)
            router_logits = flat.astype(jnp.float32) @ layer.mlp.router[...].astype(jnp.float32)
            balance += load_balance_loss(r.scores, r.experts, flat_mask)
            z_loss += router_z_loss(router_logits, flat_mask)
            moe_layers += 1
            out = out.reshape(b, t, -1)
        else:
            out = layer.mlp(h)
        x = x + out
    x = model.norm(x)
    head = model.embed_tokens[...].T if model.lm_head is None else model.lm_head[...]
    logits = jnp.einsum("btd,dv->btv", x, head, preferred_element_type=jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    counted = (input_mask & token_mask[:, 1:]).astype(jnp.float32)
    cross_entropy = -(picked * counted).sum() / jnp.maximum(counted.sum(), 1.0)
    balance = balance / max(moe_layers, 1)
    z_loss = z_loss / max(moe_layers, 1)
    total = cross_entropy + weights.load_balance * balance + weights.router_z * z_loss
    return LossTerms(total, cross_entropy, jnp.asarray(balance), jnp.asarray(z_loss))


def make_optimizer(learning_rate: float, warmup_steps: int, total_steps: int, weight_decay: float = 0.1,
                   end_fraction: float = 0.1, clip_norm: float = 1.0) -> optax.GradientTransformation:
    """AdamW with linear warm-up then cosine decay to end_fraction * learning_rate; global-norm clipping.
    Weight decay applies to matrices only (not norms)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 1),
                                                  max(total_steps, warmup_steps + 1), learning_rate * end_fraction)
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay,
                                   mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)))


class TrainState(NamedTuple):
    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array  # int32: the number of steps taken


def data_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh over `devices` (default: all) with the axis "data": batches are split along it, parameters
    and optimizer state are replicated."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return jax.sharding.Mesh(devices, ("data",), axis_types=(jax.sharding.AxisType.Auto,))


class Trainer:
    """The jitted, data-parallel train step of one model and optimizer.

    state: TrainState (float32 master parameters). compute_dtype "bfloat16" casts the parameters for the
    forward and backward passes only; the update stays in float32. capacity_factor: of the training experts
    step (module docstring).
    """

    def __init__(self, model: CausalLM, optimizer: optax.GradientTransformation, weights: LossWeights,
                 mesh: jax.sharding.Mesh, compute_dtype: str = "float32", capacity_factor: float = 2.0):
        prepare_for_training(model)
        self.graphdef, params = nnx.split(model)
        self.optimizer = optimizer
        self.mesh = mesh
        self.replicated = NamedSharding(mesh, P())
        self.batch_sharding = NamedSharding(mesh, P("data"))
        compute = jnp.dtype(compute_dtype)
        graphdef = self.graphdef

        def loss_fn(params, tokens, mask):
            cast = jax.tree.map(lambda p: p.astype(compute) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
            terms = loss_terms(nnx.merge(graphdef, cast), tokens, mask, weights, capacity_factor)
            return terms.total, terms

        def step(state: TrainState, tokens, mask):
            (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, tokens, mask)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            return TrainState(params, opt_state, state.step + 1), terms

        def evaluate(params, tokens, mask):
            return loss_fn(params, tokens, mask)[1]

        self._step = jax.jit(step, donate_argnums=0)
        self._evaluate = jax.jit(evaluate)
        self._initial_params = params

    def init(self) -> TrainState:
        # from host copies: the step donates its input state, which must never alias the initial parameters
        params = jax.device_put(jax.device_get(self._initial_params), self.replicated)
        opt_state = jax.device_put(self.optimizer.init(params), self.replicated)
        return TrainState(params, opt_state, jax.device_put(jnp.zeros((), jnp.int32), self.replicated))

    def _shard(self, tokens: np.ndarray, mask: np.ndarray | None):
        tokens = np.asarray(tokens, np.int32)
        if tokens.shape[0] % self.mesh.size:
            raise ValueError(f"batch size {tokens.shape[0]} must be a multiple of the {self.mesh.size} devices "
                             "of the data axis")
        mask = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask, bool)
        return jax.device_put(tokens, self.batch_sharding), jax.device_put(mask, self.batch_sharding)

    def step(self, state: TrainState, tokens: np.ndarray, mask: np.ndarray | None = None):
        """One optimizer step on tokens int [B, T+1] -> (new state, LossTerms of the step's input state)."""
        return self._step(state, *self._shard(tokens, mask))

    def evaluate(self, state: TrainState, tokens: np.ndarray, mask: np.ndarray | None = None) -> LossTerms:
        return self._evaluate(state.params, *self._shard(tokens, mask))

    def model(self, state: TrainState) -> CausalLM:
        """The trained model for inference (default experts implementation again), on the host."""
        model = nnx.merge(self.graphdef, jax.device_get(state.params))
        for block in model.moe_blocks():
            block.implementation = "auto"
        return model


class Checkpoints:
    """orbax CheckpointManager over TrainState: save every `interval` steps, keep the last `keep`."""

    def __init__(self, directory: str, interval: int, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(save_interval_steps=interval, max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, force: bool = False) -> None:
        step = int(state.step)
        self.manager.save(step, args=self._ocp.args.StandardSave(state), force=force)

    def restore(self, like: TrainState) -> TrainState:
        """The latest checkpoint, placed like the `like` state (same shardings)."""
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), like)
        restored = self.manager.restore(self.manager.latest_step(), args=self._ocp.args.StandardRestore(abstract))
        return TrainState(*restored)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def model_config(architecture: str, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                 num_kv_heads: int, num_experts: int, num_experts_per_tok: int, moe_intermediate_size: int,
                 max_position_embeddings: int, tie_word_embeddings: bool = False, rope_theta: float = 10000.0,
                 eos_token_id: int | None = None) -> ModelConfig:
    """The ModelConfig of an all-MoE model of a family that export_pretrained can write (OLMoE or Mixtral)."""
    from moejax.config import RopeConfig

    if architecture not in ("olmoe", "mixtral"):
        raise ValueError(f"architecture={architecture!r}: training builds 'olmoe' or 'mixtral' models")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be a multiple of num_heads={num_heads}")
    olmoe = architecture == "olmoe"
    return ModelConfig(
        architecture=architecture, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=hidden_size // num_heads, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=rope_theta), max_position_embeddings=max_position_embeddings,
        qk_norm=olmoe, tie_word_embeddings=tie_word_embeddings, intermediate_size=moe_intermediate_size,
        moe_layers=(True,) * num_layers, num_experts=num_experts, num_experts_per_tok=num_experts_per_tok,
        moe_intermediate_size=moe_intermediate_size, norm_topk_prob=not olmoe,  # as Mixtral / OLMoE-1B-7B bos_token_id=None,
        eos_token_id=eos_token_id, pad_token_id=eos_token_id)



# ---------------------------------------------------------------------------------------------------------
# A whole run: corpus -> tokenizer -> data-parallel steps with periodic validation and orbax checkpoints.


class Corpus(NamedTuple):
    tokenizer: object  # tokenizers.Tokenizer
    splits: dict  # split name -> list of data.Document
    train_stream: np.ndarray  # int32 train tokens, documents separated by END_OF_DOCUMENT
    validation_stream: np.ndarray


def prepare_corpus(config, workdir: str) -> Corpus:
    """Read and split config.corpus; train the tokenizer on the train split, or reuse workdir/tokenizer.json
    (so that a resumed run sees the same token ids)."""
    from moejax import data
    from tokenizers import Tokenizer

    documents = data.load_documents(config.corpus)
    splits = data.split_documents(documents, config.validation_fraction, config.test_fraction)
    for name in ("train", "validation"):
        if not splits[name]:
            raise ValueError(f"corpus {config.corpus!r} ({len(documents)} documents) leaves the {name} split empty; "
                             "add documents or change the split fractions")
    path = os.path.join(workdir, "tokenizer.json")
    if os.path.isfile(path):
        tokenizer = Tokenizer.from_file(path)
    else:
        tokenizer = data.train_tokenizer((d.text for d in splits["train"]), config.vocab_size)
        os.makedirs(workdir, exist_ok=True)
        tokenizer.save(path)
    separator = tokenizer.token_to_id(data.END_OF_DOCUMENT)
    streams = [data.token_stream(data.encode_documents(tokenizer, splits[s]), separator)
               for s in ("train", "validation")]
    return Corpus(tokenizer, splits, *streams)


def build_model(config, tokenizer) -> CausalLM:
    """The freshly initialised model of config.model, sized to the tokenizer's vocabulary."""
    from moejax import data

    m = config.model
    architecture = model_config(
        m.architecture, tokenizer.get_vocab_size(), m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads,
        m.num_experts, m.num_experts_per_tok, m.moe_intermediate_size, m.max_position_embeddings,
        tie_word_embeddings=m.tie_word_embeddings, eos_token_id=tokenizer.token_to_id(data.END_OF_DOCUMENT))
    return CausalLM(architecture, rngs=nnx.Rngs(config.seed))


def run(config, workdir: str, progress: bool = True, devices=None, stop_after: int | None = None) -> dict:
    """Train per `config` in `workdir`, resuming from its latest checkpoint if there is one; `stop_after`
    ends the call after that step (checkpointed), as an interruption would, without changing the schedule.

    The batch of step i is a function of (config.seed, i) only, so an interrupted run continues exactly as an
    uninterrupted one would. Returns {"model", "tokenizer", "corpus", "history"}: history holds, per step
    taken in this call, the training loss terms, and per validation, the validation cross-entropy."""
    from tqdm import tqdm

    from moejax import data

    corpus = prepare_corpus(config, workdir)
    model = build_model(config, corpus.tokenizer)
    optimizer = make_optimizer(config.learning_rate, config.warmup_steps, config.steps, config.weight_decay)
    weights = LossWeights(config.load_balance_coef, config.router_z_coef)
    trainer = Trainer(model, optimizer, weights, data_mesh(devices), config.compute_dtype, config.capacity_factor)
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), config.checkpoint_every)
    state = trainer.init()
    if checkpoints.latest_step() is not None:
        state = checkpoints.restore(state)
    validation = np.stack([c for c in data.chunks(corpus.validation_stream, config.sequence_length + 1,
                                                  config.eval_sequences) if len(c) == config.sequence_length + 1])
    validation = validation[:len(validation) - len(validation) % trainer.mesh.size]
    if not len(validation):
        raise ValueError(f"the validation split has fewer than {config.sequence_length + 1} * {trainer.mesh.size} "
                         "tokens; lower sequence_length or add documents")

    history = {"train": [], "validation": []}
    start = int(state.step)
    tokens_per_step = config.batch_size * config.sequence_length
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=config.steps, disable=not progress,
               desc="train", unit="step")
    clock = None
    for step in bar:
        batch = data.training_batch(corpus.train_stream, config.seed, step, config.batch_size, config.sequence_length)
        state, terms = trainer.step(state, batch)
        terms = LossTerms(*(float(t) for t in terms))  # waits for the step: honest timing
        now = time.perf_counter()
        rate = tokens_per_step / (now - clock) if clock is not None else None  # the first step compiles
        clock = now
        history["train"].append({"step": step + 1, **terms._asdict(), "tokens_per_s": rate})
        bar.set_postfix(loss=f"{terms.cross_entropy:.3f}", tok_s=f"{rate or 0:,.0f}")
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            ce = float(trainer.evaluate(state, validation).cross_entropy)
            history["validation"].append({"step": step + 1, "cross_entropy": ce, "perplexity": float(np.exp(ce))})
            bar.write(f"step {step + 1}: validation cross-entropy {ce:.4f} (perplexity {np.exp(ce):.2f})")
        checkpoints.save(state, force=step + 1 == end)
    checkpoints.close()
    return {"model": trainer.model(state), "tokenizer": corpus.tokenizer, "corpus": corpus, "history": history,
            "state": state}
