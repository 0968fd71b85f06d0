"""experiments/evaluate.py: a checkpoint's validation perplexity against a unigram baseline, held-out
multiple-choice accuracy, and how unevenly its experts are loaded in prefill and decode (the reproduction's
straggler stage).

  python experiments/evaluate.py --workdir=experiments/results/default_model
  python experiments/evaluate.py --config=configs/evaluate.py:quick --config.checkpoint=/data/OLMoE-1B-7B-0924

Variants: "" (the full evaluation) and "quick" (fewer sequences, examples and decode steps).
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "quick"):
        raise ValueError(f"unknown variant {arg!r} of configs/evaluate.py; variants: '' (full), 'quick'")
    quick = arg == "quick"
    config = ml_collections.ConfigDict()
    config.checkpoint = "experiments/default_model"  # any load_pretrained directory with a tokenizer.json
    # the corpus and split the checkpoint was trained with (configs/train_default.py for the default model)
    config.corpus = ml_collections.ConfigDict(dict(source="stdlib", validation_fraction=0.05, test_fraction=0.05))
    config.length = 256  # tokens per perplexity / routing sequence
    config.max_sequences = 64 if quick else 0  # cap on validation sequences (0: all)
    config.batch_size = 8
    config.examples = 200 if quick else 500  # examples of each held-out continuation task
    config.choices = 4
    config.tasks = ()  # more lm-eval style JSONL tasks ({context, choices, gold})
    config.decode_prompts = 8 if quick else 16  # prompts decoded together for the decode routing
    config.decode_steps = 16 if quick else 32
    return config
