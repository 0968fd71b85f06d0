"""Training a small MoE language model: losses with router auxiliaries (losses), the data-parallel
AdamW step and checkpoints (trainer), a whole run from a corpus (run); an encoder-decoder translation model
the same way (translation: its run, from function -> docstring pairs)."""

from moejax.training.losses import (DROPLESS_IMPLEMENTATION, LossTerms, LossWeights, for_training, lm_loss,
                                    load_balance_loss, loss_terms, router_z_loss, seq2seq_loss)
from moejax.training.run import Corpus, build_model, model_config, prepare_corpus, run
from moejax.training.trainer import Checkpoints, Trainer, TrainState, data_mesh, make_optimizer

__all__ = ["Checkpoints", "Corpus", "DROPLESS_IMPLEMENTATION", "LossTerms", "LossWeights", "TrainState", "Trainer",
           "build_model", "data_mesh", "for_training", "lm_loss", "load_balance_loss", "loss_terms", "make_optimizer",
           "model_config", "prepare_corpus", "router_z_loss", "run", "seq2seq_loss"]
