"""moejax as an lm-evaluation-harness model, `--model moejax`: the Capacity-Aware Inference paper's evaluation
protocol (lm-eval tasks, a capacity policy switched on) on any checkpoint that moejax loads.

    python -m moejax.lm_eval_model --model_args pretrained=PATH,capacity_factor=1.5,drop=score --tasks piqa
    python -m moejax.lm_eval_model --model_args pretrained=experiments/default_model \\
        --include_path experiments/lm_eval_tasks --tasks moejax_tasks --output_path workdir/lm_eval

lm-eval 0.4.13 knows the models of its own registry and reads no plugin entry points, so `moejax` is a model
name once this module is imported. `python -m moejax.lm_eval_model ARGS` imports it and runs lm-eval's own
command line with ARGS (`--model moejax` added when ARGS name no model). From Python: `import
moejax.lm_eval_model`, then `lm_eval.simple_evaluate(model="moejax", model_args=...)`; or
`evaluate_tasks(model, tokenizer, tasks)` for a model already built (its policy, its mesh).

Requests are served as lm-eval's Hugging Face backend (`--model hf`, the reference) serves them: the same
tokenisation (context and continuation encoded together and split), the same left truncation to max_length
for log-likelihoods and to max_length - max_gen_toks for generation prompts, the same rolling windows,
greedy `generate_until` cut at the stop sequences. Batching differs on purpose: requests are batched per
task (never mixed across tasks), sorted by length, bucketed (moejax.evaluation.score_continuations), so
that under a capacity policy a task's numbers do not depend on which other tasks ran beside it, and equal
`moejax.evaluation.score_multiple_choice(..., encode_pair=MoejaxLM._encode_pair)` on the same examples.

Each run records, beside the metrics, what the policy enforced: lm-eval's results["config"]["moejax"]
(the results JSON of --output_path) holds the policy, batch size, mesh, and per task and request type
the per-layer expert loads (routed, kept), the drop rate and the tokens that lost every expert.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import warnings

import jax
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from moejax import evaluation
from moejax.capacity import MoEPolicy
from moejax.checkpoints import _read_json, load_pretrained, load_tokenizer
from moejax.config import is_integer
from moejax.generate import decode
from moejax.models.transformer import CausalLM

logger = logging.getLogger("lm_eval.models.moejax")

POLICY_ARGS = ("capacity_factor", "drop", "expanded", "scope", "num_devices", "in_decode", "renormalize", "seed")
MODEL_ARGS = {
    "pretrained": "checkpoint directory (config.json, *.safetensors, tokenizer.json) or a save_converted one",
    "dtype": "parameter dtype (float32, bfloat16, float16); default float32",
    "batch_size": "requests per forward, default 16 (also lm-eval's --batch_size; model_args wins); under a "
                  "capacity policy the requests of a batch share the experts' capacity",
    "max_length": "most tokens fed per request, default max_position_embeddings; longer ones lose context "
                  "from the left",
    "max_gen_toks": "generate_until's new tokens when a task names none, default 256",
    "prefix_token_id": "the token an empty context starts from (lm-eval's hf backend's argument); default the "
                       "tokenizer's bos_token, else its eos_token (tokenizer_config.json), else config.json's",
    **{name: "moejax.MoEPolicy field" for name in POLICY_ARGS},
    "mesh": "expert parallelism: E (an expert axis of E devices) or DxE (data x expert devices)",
    "gating": "with a mesh: dynamic (default) or static",
    "device": "accepted from lm-eval's command line and ignored: JAX picks the devices (JAX_PLATFORMS)",
    "max_batch_size": "accepted from lm-eval's command line and ignored (no batch_size=auto)",
}
GENERATION_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")


def _error(message: str) -> ValueError:
    return ValueError(f"moejax model_args: {message}")


def special_tokens(path: str, tokenizer) -> dict | None:
    """{"bos": id or None, "eos": id or None} as tokenizer_config.json names them (lm-eval's hf backend reads
    its tokenizer's), or None where the checkpoint has no tokenizer_config.json. A named token that the
    tokenizer does not hold fails naming it."""
    file = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(file):
        return None
    content = _read_json(file)
    if not isinstance(content, dict):
        raise ValueError(f"{file} must hold a JSON object; got {type(content).__name__}")
    ids = {}
    for kind in ("bos", "eos"):
        token = content.get(f"{kind}_token")
        token = token.get("content") if isinstance(token, dict) else token  # an AddedToken's serialised form
        if token is not None and (not isinstance(token, str) or tokenizer.token_to_id(token) is None):
            raise ValueError(f"{file}: {kind}_token={token!r} is not a token of the checkpoint's tokenizer.json")
        ids[kind] = None if token is None else tokenizer.token_to_id(token)
    return ids


def _integer(name: str, value, minimum: int = 1) -> int:
    """An integer model arg (lm-eval's command line passes --batch_size as a string)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " (batch_size=auto is not supported: the batch is part of a capacity policy's result)" \
            if name == "batch_size" and value == "auto" else ""
        raise _error(f"{name}={value!r} must be an integer >= {minimum}{extra}")
    return value


def _settings(batch_size, max_length, max_gen_toks) -> tuple[int, int | None, int]:
    return (_integer("batch_size", batch_size), None if max_length is None else _integer("max_length", max_length),
            _integer("max_gen_toks", max_gen_toks))


def policy_from_args(**fields) -> MoEPolicy:
    """A MoEPolicy from model args (POLICY_ARGS); a bad value fails naming it."""
    unknown = sorted(set(fields) - set(POLICY_ARGS))
    if unknown:
        raise _error(f"{unknown[0]!r} is no policy field; policy fields: {POLICY_ARGS}")
    if not isinstance(fields.get("in_decode", True), bool):
        raise _error(f"in_decode={fields['in_decode']!r} must be true or false")
    for name, minimum in (("num_devices", 1), ("seed", 0)):
        if fields.get(name) is not None:
            fields[name] = _integer(name, fields[name], minimum)
    try:
        return MoEPolicy(**fields)
    except (TypeError, ValueError) as e:
        raise _error(str(e)) from None


def parse_mesh(spec):
    """None, E or "E" (an expert axis of E devices) or "DxE" (data x expert) -> a make_mesh Mesh or None."""
    if spec is None:
        return None
    text = str(spec).strip().lower()
    parts = text.split("x")
    if isinstance(spec, bool) or not 1 <= len(parts) <= 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise _error(f"mesh={spec!r} must be E (expert devices) or DxE (data x expert devices), positive integers")
    from moejax import parallel

    data, expert = (1, int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    try:
        return parallel.make_mesh(expert=expert, data=data)
    except ValueError as e:
        raise _error(f"mesh={spec!r}: {e}") from None


class MoejaxLM(TemplateLM):
    """lm-eval's LM API over a moejax model: loglikelihood (with is_greedy), loglikelihood_rolling and
    generate_until, on the model's MoE runtime (policy, experts backend, mesh). See the module docstring."""

    def __init__(self, pretrained=None, dtype="float32", batch_size=16, max_length=None, max_gen_toks=256,
                 mesh=None, gating=None, device=None, max_batch_size=None, prefix_token_id=None, **policy):
        super().__init__()
        unknown = sorted(set(policy) - set(POLICY_ARGS))
        if unknown:
            raise _error(f"unknown argument {unknown[0]!r}; accepted: {', '.join(MODEL_ARGS)}")
        if pretrained is None:
            raise _error("pretrained=PATH (a checkpoint directory) is required")
        moe_policy = policy_from_args(**policy)
        if gating is not None and mesh is None:
            raise _error(f"gating={gating!r} applies to expert parallelism and needs a mesh (mesh=8 or mesh=2x4)")
        if device is not None:
            warnings.warn(f"moejax ignores device={device!r}: JAX picks the devices ({jax.default_backend()} here)")
        settings = _settings(batch_size, max_length, max_gen_toks)
        mesh_ = parse_mesh(mesh)
        try:
            model = load_pretrained(pretrained, dtype=dtype, policy=moe_policy, mesh=mesh_, gating=gating)
            tokenizer = load_tokenizer(pretrained)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"moejax model_args: pretrained={pretrained!r}: {e}") from None
        except ValueError as e:  # load_pretrained's errors name the bad value (dtype, a tensor, a file)
            raise _error(str(e)) from None
        if tokenizer is None:
            raise _error(f"pretrained={pretrained!r} has no tokenizer.json (lm-eval's requests are text)")
        self._serve(model, tokenizer, *settings, {"checkpoint": str(pretrained), "dtype": str(dtype)},
                    special_tokens(pretrained, tokenizer), prefix_token_id)

    @classmethod
    def for_model(cls, model: CausalLM, tokenizer, batch_size: int = 16, max_length: int | None = None,
                  max_gen_toks: int = 256, prefix_token_id: int | None = None) -> MoejaxLM:
        """Serve a model already built (policy and mesh as they are) with a tokenizers.Tokenizer (its bos and
        eos: the model config's, where no tokenizer_config.json says otherwise)."""
        self = cls.__new__(cls)
        TemplateLM.__init__(self)
        self._serve(model, tokenizer, *_settings(batch_size, max_length, max_gen_toks), {"checkpoint": None},
                    None, prefix_token_id)
        return self

    def _serve(self, model, tokenizer, batch_size, max_length, max_gen_toks, info: dict, special: dict | None,
               prefix_token_id: int | None) -> None:
        if prefix_token_id is not None and not (is_integer(prefix_token_id)
                                                and 0 <= int(prefix_token_id) < model.config.vocab_size):
            raise _error(f"prefix_token_id={prefix_token_id!r} must be a token id in [0, {model.config.vocab_size})")
        self._special, self._prefix = special, None if prefix_token_id is None else int(prefix_token_id)
        self.model, self.tokenizer = model, tokenizer
        self._batch_size, self._max_gen_toks = batch_size, max_gen_toks
        self._max_length = model.config.max_position_embeddings if max_length is None else max_length
        runtimes = [block.runtime for block in model.moe_blocks()]
        self.policy = runtimes[0].policy if runtimes else None
        policies = [dataclasses.asdict(r.policy) for r in runtimes]
        mesh = runtimes[0].layout.mesh if runtimes and runtimes[0].layout is not None else None
        self.info = {**info, "policy": policies[0] if policies and policies.count(policies[0]) == len(policies)
                     else policies, "experts": repr(runtimes[0].experts) if runtimes else None,
                     "mesh": None if mesh is None else dict(mesh.shape),
                     "batch_size": self._batch_size, "max_length": self._max_length}
        self._loads: dict[str, dict] = {}  # task -> request type -> (requests, loads summed over its batches)
        self._stops: dict[tuple, tuple[int, ...]] = {}
        self._task, self._pending = None, None  # the task being served: its progress bar, its loads so far

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """lm-eval's --batch_size always arrives (default 1) beside model_args: a batch_size in model_args wins."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    # -- what lm-eval reads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The checkpoint's end-of-sequence ids (generation_config.json over config.json); generation stops at any."""
        eos = self.model.config.eos_token_id
        eos = eos if isinstance(eos, tuple) else () if eos is None else (eos,)
        if not eos:
            raise ValueError("the checkpoint names no eos_token_id (config.json / generation_config.json): lm-eval "
                             "needs one to start empty contexts and rolling windows and to stop generations")
        return eos

    @property
    def eot_token_id(self) -> int:
        """The tokenizer's eos_token where tokenizer_config.json names one (lm-eval's hf backend's), else the
        checkpoint's first end-of-sequence id."""
        if self._special is not None and self._special["eos"] is not None:
            return self._special["eos"]
        return self.eos_token_ids[0]

    @property
    def prefix_token_id(self) -> int:
        """As lm-eval's hf backend: prefix_token_id= if given, else the tokenizer's bos_token, else eot_token_id;
        without a tokenizer_config.json, the model config's bos_token_id stands for the tokenizer's."""
        if self._prefix is not None:
            return self._prefix
        bos = self.model.config.bos_token_id if self._special is None else self._special["bos"]
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.info.get("checkpoint"))

    @property
    def loads(self) -> dict:
        """{task: {request type: what the policy enforced}} so far (see `_summary`)."""
        return {task: {kind: _summary(loads, n) for kind, (n, loads) in kinds.items()}
                for task, kinds in self._loads.items()}

    def get_model_info(self) -> dict:
        """Merged into lm-eval's results["config"]: the run's settings and the loads the policy enforced."""
        return {"moejax": {**self.info, "loads": self.loads}}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The checkpoint's tokenizer.json; its post-processor adds special tokens unless asked not to, or
        unless the text already starts with the prefix token (as lm-eval's hf backend does)."""
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(self.tokenizer.id_to_token(self.prefix_token_id) or "\0")
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens).ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # -- requests, one task at a time

    def _by_task(self, requests, kind: str, run) -> list:
        """run(a task's requests) for each task in turn, its enforced loads recorded under loads[task][kind]."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(str(r.task_name), []).append(i)
        out = [None] * len(requests)
        for task, index in groups.items():
            self._task = f"moejax {task} {kind}"
            self._pending = self._loads.get(task, {}).get(kind, (0, None))[1]
            for i, answer in zip(index, run([requests[i] for i in index])):
                out[i] = answer
            n = self._loads.get(task, {}).get(kind, (0, None))[0] + len(index)
            self._loads.setdefault(task, {})[kind] = (n, self._pending)
            logger.info(f"moejax: {task}: {len(index)} {kind} requests, drop rate "
                        f"{_summary(self._pending, n)['drop_rate']:.4f}")
        return out

    def _score(self, pairs) -> evaluation.ScoredContinuations:
        scored = evaluation.score_continuations(self.model, pairs, self._batch_size, self._max_length, with_loads=True,
                                                progress=self._task)
        self._pending = evaluation.add_loads(self._pending or {}, scored.loads)
        return scored

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scored = self._score([(context, continuation) for _, context, continuation in requests])
        answers = [(float(ll), bool(g)) for ll, g in zip(scored.log_likelihoods, scored.greedy)]
        for (strings, _, _), answer in zip(requests, answers):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return answers

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._by_task(requests, "loglikelihood",
                             lambda group: super(MoejaxLM, self).loglikelihood(group, disable_tqdm=True))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over lm-eval's rolling windows of max_length tokens (the first after the
        prefix token), every token predicted once."""
        def run(group):
            windows, owners = [], []
            for i, r in enumerate(group):
                for w in lm_utils.get_rolling_token_windows(token_list=self.tok_encode(r.args[0]),
                                                            prefix_token=self.prefix_token_id,
                                                            max_seq_len=self._max_length, context_len=1):
                    windows.append(lm_utils.make_disjoint_window(w))
                    owners.append(i)
            totals = np.zeros(len(group), np.float64)
            np.add.at(totals, np.asarray(owners, np.int64), self._score(windows).log_likelihoods)
            for r, total in zip(group, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", r.args, float(total))
            return [float(t) for t in totals]

        return self._by_task(requests, "loglikelihood_rolling", run)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with do_sample, sampled) generation in batches through moejax's decode loop. A row stops
        at eos or at the first token whose own text holds a stop sequence; the text is then cut at the stop
        sequences (lm-eval's postprocessing), so stop sequences spread over tokens end it just as in hf."""
        out = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        for index in groups.values():
            for i, text in zip(index, self._by_task([requests[i] for i in index], "generate_until", self._generate)):
                out[i] = text
        return out

    def _generate(self, group) -> list[str]:
        kwargs = dict(normalize_gen_kwargs(dict(group[0].args[1]), self._max_gen_toks))
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id], False))
        max_gen = kwargs.pop("max_gen_toks")
        sample = bool(kwargs.pop("do_sample", False)) and float(kwargs.get("temperature", 0.0)) > 0
        temperature, top_p = float(kwargs.pop("temperature", 0.0)), float(kwargs.pop("top_p", 1.0))
        if kwargs:
            raise ValueError(f"moejax generate_until: generation kwargs {sorted(kwargs)} are not supported "
                             f"(supported: {GENERATION_KWARGS})")
        room = self._max_length - max_gen
        if room < 1:
            raise ValueError(f"moejax generate_until: max_gen_toks={max_gen} leaves no room for a prompt in "
                             f"max_length={self._max_length}")
        prompts = [self.tok_encode(r.args[0])[-room:] or [self.prefix_token_id] for r in group]
        eos = {t for t in self.eos_token_ids if 0 <= t < self.model.config.vocab_size}
        stops = tuple(sorted(eos | set(self._stop_tokens(tuple(until)))))
        order = sorted(range(len(group)), key=lambda i: -len(prompts[i]))
        texts = [None] * len(group)
        for number, start in enumerate(tqdm(range(0, len(order), self._batch_size), desc=self._task)):
            index = order[start:start + self._batch_size]
            key = jax.random.fold_in(jax.random.key(self.policy.seed if self.policy else 0), number)
            result = decode(self.model, [prompts[i] for i in index], max_gen, record_loads=True, stop_tokens=stops,
                            temperature=temperature if sample else 0.0, top_p=top_p if sample else 1.0,
                            key=key if sample else None)
            self._pending = _add_generation_loads(self._pending, result)
            for row, i in enumerate(index):
                tokens = np.asarray(result.tokens[row]).tolist()
                end = next((j for j, t in enumerate(tokens) if t in stops), len(tokens))
                tokens = tokens[:end] if end == len(tokens) or tokens[end] in eos else tokens[:end + 1]
                texts[i] = postprocess_generated_text(self.tok_decode(tokens), until, None)
                self.cache_hook.add_partial("generate_until", group[i].args, texts[i])
        return texts

    def _stop_tokens(self, until: tuple[str, ...]) -> tuple[int, ...]:
        """The vocabulary's tokens whose own text holds one of the stop sequences (cached per sequence set)."""
        if until not in self._stops:
            size = min(self.tokenizer.get_vocab_size(), self.model.config.vocab_size)
            texts = self.tokenizer.decode_batch([[t] for t in range(size)], skip_special_tokens=False)
            self._stops[until] = tuple(t for t, text in enumerate(texts) if any(u and u in text for u in until))
        return self._stops[until]


if __name__ != "__main__":  # `python -m moejax.lm_eval_model` registers the class of the imported module (main)
    register_model("moejax")(MoejaxLM)


# ---------------------------------------------------------------------------------------------------------
# What a run enforced, in a JSON-ready form


def _add_generation_loads(total, result) -> dict:
    """{"prefill" | "decode": {MoE layer index: (routed [E], kept [E])}} summed over generate batches."""
    total = total or {"prefill": {}, "decode": {}}
    routed, kept = np.asarray(result.loads, np.int64), np.asarray(result.kept_loads, np.int64)
    for phase, rows in (("prefill", slice(0, 1)), ("decode", slice(1, None))):
        for n, (r, k) in enumerate(zip(routed[rows].sum(0), kept[rows].sum(0))):
            before = total[phase].get(n, (0, 0))
            total[phase][n] = (before[0] + r, before[1] + k)
    return total


def _drop(routed, kept_of_routed) -> float:
    routed = int(np.sum(routed))
    return float(1 - int(np.sum(kept_of_routed)) / routed) if routed else 0.0


def _summary(loads, requests: int) -> dict:
    """The JSON record of one task's requests of one type: totals over layers and each MoE layer's loads.
    Scored requests: stats.LayerLoads per layer. Generation: routed and kept pairs per layer, prefill and
    decode steps apart (under expanded drop, kept also counts the added candidates)."""
    if loads is None:
        return {"requests": requests, "drop_rate": 0.0, "layers": {}}
    if "prefill" in loads:
        phases = {phase: {"drop_rate": _drop([r for r, _ in layers.values()], [k for _, k in layers.values()]),
                          "layers": {str(n): {"routed": r.tolist(), "kept": k.tolist()} for n, (r, k) in layers.items()}}
                  for phase, layers in loads.items()}
        every = [v for layers in loads.values() for v in layers.values()]
        return {"requests": requests, "drop_rate": _drop([r for r, _ in every], [k for _, k in every]), **phases}
    tokens = sum(l.tokens for l in loads.values())
    return {"requests": requests,
            "drop_rate": _drop([l.routed for l in loads.values()], [l.kept_of_routed for l in loads.values()]),
            "tokens_without_experts": sum(l.tokens_without_experts for l in loads.values()) / tokens if tokens else 0.0,
            "layers": {str(layer): l.to_dict() for layer, l in loads.items()}}


# ---------------------------------------------------------------------------------------------------------
# Entry points


def evaluate_tasks(model: CausalLM, tokenizer, tasks, *, include_path: str | None = None,
                   include_defaults: bool = True, batch_size: int = 16, max_length: int | None = None,
                   limit: int | None = None, num_fewshot: int | None = None) -> dict:
    """lm-eval tasks (names, or YAML files) scored with a model already built (e.g. moejax.with_policy(model,
    policy) in a capacity sweep) -> {"tasks": {task: {metric: value}}, "moejax": the run's record (policy,
    batch size, loads per task)}. include_path: a directory of local task YAMLs; include_defaults=False skips
    indexing lm-eval's built-in tasks (seconds) when every task is local. Metric names are lm-eval's, with the
    default ",none" filter dropped (acc, acc_norm, exact_match, word_perplexity, ...)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = MoejaxLM.for_model(model, tokenizer, batch_size=batch_size, max_length=max_length)
    index = TaskManager(include_path=include_path, include_defaults=include_defaults)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=index, limit=limit,
                                      num_fewshot=num_fewshot, bootstrap_iters=0, log_samples=False)
    metrics = {task: {key.removesuffix(",none"): value for key, value in r.items()
                      if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
               for task, r in results["results"].items()}
    return {"tasks": metrics, "moejax": results["config"]["moejax"]}


def main(argv=None) -> None:
    """lm-eval's command line with `moejax` registered (and the default model, when ARGS name none)."""
    import moejax.lm_eval_model  # noqa: F401  (registers MoejaxLM under its module's name)
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a in ("--model", "-M") or a.startswith("--model=") for a in args) and args[:1] not in (["ls"], ["validate"]):
        args = ["--model", "moejax", *args]
    sys.argv = ["lm-eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
