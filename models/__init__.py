"""Hand-written PyTorch models that generate correctly, with cached decoding.

Each class keeps the constructor and parameter names of its plain version (so old state_dicts load
with strict=True). Its `kind` (runtime/manifest.py's KINDS) says what it is. The encoder-decoders
offer one generation interface, batch-first:
- `full_forward(input_ids, attention_mask, decoder_input_ids)`: teacher-forced logits;
- `encode(input_ids, attention_mask)`: `last_hidden_state` plus the initial decoder states;
- `state_specs()`: the decoder states, described with the export contract's `StateTensor`;
- `start_states(encoded)` and `step(input_ids, encoder_inputs, states)`: one cached decoder position;
- `step_inputs`: the encoder tensors the step reads (`encoder_attention_mask`, `encoder_hidden_states`).

The decoder-only language models (`models.decoder_only`) have `full_forward(input_ids, attention_mask)`,
`state_specs()`, `start_states(batch)` and `step(input_ids, attention_mask, states)`, which takes the
prompt and then one token per call; the regressor (`models.regressor`) works on float features.

`models.generate` runs greedy and beam search over those interfaces (the PyTorch reference);
`models.checkpoint` reads and writes the checkpoint directory that s2s-export takes.
"""

from models.decoder_only import DecoderOnly, SimpleDecoderOnly
from models.lstm import EncoderDecoder, EnhancedEncoderDecoder
from models.regressor import SimpleEncoderDecoder
from models.transformer import EfficientInstructionLLM, HybridModel, InstructionLLM, TransformerSeq2Seq

MODEL_CLASSES = {cls.__name__: cls for cls in (
    EncoderDecoder, EnhancedEncoderDecoder, InstructionLLM, HybridModel, EfficientInstructionLLM,
    SimpleDecoderOnly, DecoderOnly, SimpleEncoderDecoder)}

# The encoder-decoders' common interface (above) is that of these two bases: what models.generate
# and the exporter's custom source take.
Seq2SeqModel = EncoderDecoder | TransformerSeq2Seq

__all__ = ["MODEL_CLASSES", "Seq2SeqModel", "EncoderDecoder", "EnhancedEncoderDecoder", "InstructionLLM", "HybridModel",
           "EfficientInstructionLLM", "SimpleDecoderOnly", "DecoderOnly", "SimpleEncoderDecoder"]
