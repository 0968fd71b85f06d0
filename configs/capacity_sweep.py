"""experiments/capacity_sweep.py: capacity factor x drop strategy on a checkpoint (He et al., papers.md A).

  python experiments/capacity_sweep.py --workdir=experiments/results/capacity_sweep
  python experiments/capacity_sweep.py --config=configs/capacity_sweep.py:quick --config.tasks='()'

Variants: "" (the full sweep) and "quick" (fewer factors, strategies, sequences, examples and repeats).
"""

import ml_collections

STRATEGIES = ("score", "first", "last", "random", "expanded_local", "expanded_global")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "quick"):
        raise ValueError(f"unknown variant {arg!r} of configs/capacity_sweep.py; variants: '' (full), 'quick'")
    quick = arg == "quick"
    config = ml_collections.ConfigDict()
    # a load_pretrained directory with a tokenizer.json; "": a random built-in model on random tokens (its
    # quality numbers mean nothing; needs tasks=())
    config.checkpoint = "experiments/default_model"
    # the corpus and split the checkpoint was trained with (configs/train_default.py for the default model)
    config.corpus = ml_collections.ConfigDict(dict(source="stdlib", validation_fraction=0.05, test_fraction=0.05))
    # lm-eval style multiple-choice JSONL files; a task's name is its file name without .jsonl
    config.tasks = ("experiments/results/default_model/next_word.jsonl",
                    "experiments/results/default_model/next_line.jsonl")
    config.task_examples = 100 if quick else 250  # the first N examples of each task (0: all)
    # lm-eval tasks scored in every cell too, through moejax's lm-eval backend (pip install moejax[eval]):
    # names of local YAML tasks in include_path (experiments/lm_eval_tasks has the default model's), or of
    # lm-eval's built-in ones (piqa, ...: include_defaults=True and their datasets reachable); limit: the
    # first N documents of each (0: all)
    config.lm_eval = ml_collections.ConfigDict(dict(tasks=(), include_path="experiments/lm_eval_tasks",
                                                    include_defaults=False, limit=0))
    # capacity factors gamma (> 0); the dropless reference always runs first
    config.factors = (1.0, 1.5, 2.0) if quick else (0.5, 1.0, 1.25, 1.5, 2.0)
    config.strategies = STRATEGIES[:5] if quick else STRATEGIES
    # True: every cell's policy is moejax.MoEPolicy.authors (the paper authors' code: capacity off in decode
    # steps, their renormalisation); the sweep's forwards are whole sequences, so only the renormalisation of
    # families that normalise their top-k (not the default OLMoE model's) could move a number
    config.authors_semantics = False
    config.num_devices = 8  # devices of the expert axis (local experts, the busiest device)
    config.sequences = 12 if quick else 32  # validation windows, spread evenly over the split
    config.length = 256  # tokens per window
    # sequences (or choice requests) per forward: the tokens of one batch share the experts' capacity
    config.batch_size = 8
    config.repeats = 3 if quick else 30  # timed repeats of the busiest device's expert work (median)
    return config
