"""Train a small MoE model on real text and export it as a Hugging Face checkpoint: the language model
(configs/train_default.py) or, with config.task "translation", the encoder-decoder MT model (configs/train_mt.py).

    python experiments/train.py --config=configs/train_default.py --workdir=workdir/train_default
    python experiments/train.py --config=configs/train_default.py:quick --workdir=/tmp/train   # 20 steps
    python experiments/train.py --config=configs/train_mt.py --workdir=workdir/train_mt

Resumes from --workdir's latest orbax checkpoint when interrupted (same batches as an uninterrupted run); a
resume with other settings than the run started with is refused, naming them (--workdir/run_settings.json).
Writes --workdir/export/ (config.json, model.safetensors, tokenizer.json: moejax.load_pretrained and
transformers read it) and --workdir/train_results.json (the whole run's loss curve and validation, kept with
the checkpoints in --workdir/history.json; timing). Evaluate the export
with experiments/evaluate.py.
"""

from __future__ import annotations

import os
import time

import harness


def main(config, workdir):
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    import jax

    import moejax
    from moejax.results import write_json_atomically
    from moejax import training

    os.makedirs(workdir, exist_ok=True)
    print(f"Training on {len(jax.devices())} {jax.default_backend()} device(s); workdir {workdir}")
    translating = config.get("task", "language_model") == "translation"
    if translating:
        from moejax import seq2seq
        from moejax.training import translation

        run, export_pretrained, load_pretrained = translation.run, seq2seq.export_pretrained, seq2seq.load_pretrained
    else:
        run, export_pretrained, load_pretrained = training.run, moejax.export_pretrained, moejax.load_pretrained
    start = time.perf_counter()
    result = run(config, workdir)
    seconds = time.perf_counter() - start
    export = os.path.join(workdir, "export")
    trained = result["model"]
    # the workdir's export is this script's own: a resumed run replaces it. Another dtype: export in float32
    # first, then reload at the export dtype (the checkpoint's config says its own dtype)
    if config.export_dtype != "float32":
        export_pretrained(trained, export, overwrite=True)
        trained = load_pretrained(export, dtype=config.export_dtype)
    export_pretrained(trained, export, tokenizer=result["tokenizer"], overwrite=True)
    train = result["history"]["train"]
    rates = [t["tokens_per_s"] for t in train if t["tokens_per_s"]]
    summary = {
        "config": config.to_dict(), "workdir": workdir, "export": export,
        "wall_seconds_this_call": seconds, "steps_this_call": result["steps_this_call"],
        "median_tokens_per_s": sorted(rates)[len(rates) // 2] if rates else None,
        "parameters": sum(x.size for x in jax.tree.leaves(result["state"].params)),
        "history": result["history"], "devices": [str(d) for d in jax.devices()],
        **harness.header(),
    }
    write_json_atomically(os.path.join(workdir, "train_results.json"), summary)
    print(f"Trained {result['steps_this_call']} steps in {seconds / 60:.1f} min; exported to {export}")


if __name__ == "__main__":
    harness.run(main, workdir="workdir/train_default", config="configs/train_default.py")
