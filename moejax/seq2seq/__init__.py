"""Encoder-decoder MoE models (NLLB-MoE, Switch Transformers): config readers, the model, its checkpoints and
generation through moejax.generate (registered on import)."""

from moejax.seq2seq.checkpoints import export_pretrained, load_pretrained, read_config, to_hf_config
from moejax.seq2seq.config import MODEL_TYPES, NLLB_MOE, SWITCH, Seq2SeqConfig, from_hf_config
from moejax.seq2seq.generate import decode
from moejax.seq2seq.model import EncoderDecoderLM, Seq2SeqOutput, random_model
from moejax.seq2seq.moe import FamilyCapacity, FamilyMoEBlock
from moejax.seq2seq.stats import load_trace

__all__ = ["EncoderDecoderLM", "FamilyCapacity", "FamilyMoEBlock", "MODEL_TYPES", "NLLB_MOE", "SWITCH", "Seq2SeqConfig",
           "Seq2SeqOutput", "decode", "export_pretrained", "from_hf_config", "load_pretrained", "load_trace",
           "random_model", "read_config", "to_hf_config"]
