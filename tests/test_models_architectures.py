"""models/: plain checkpoints load strictly, the cached step equals the full forward, and the reference
generate (greedy and beam) equals transformers' generate."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import models
from models.checkpoint import ModelConfig, load_checkpoint, save_checkpoint
from models.generate import generate
from runtime.manifest import StateTensor
from tests import plain_models
from tests.custom_models import ARGS, CLASSES, MAX_NEW_TOKENS, TOKENS, VOCAB, random_model, sample_batch, torch_threads

# the plain constructors take no keyword options: the sizes the plain versions can express
PLAIN_ARGS = {
    "EncoderDecoder": dict(vocab_size=VOCAB, hidden_size=16),
    "EnhancedEncoderDecoder": dict(vocab_size=VOCAB, hidden_size=16),
    "InstructionLLM": dict(vocab_size=VOCAB, d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=1),
    "HybridModel": dict(vocab_size=VOCAB, d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=2),
    "EfficientInstructionLLM": dict(vocab_size=VOCAB, d_model=16, nhead=2, num_layers=2),
}
# what keeps the plain math where the plain math is well defined (see models/README.md)
PLAIN_OPTIONS = {
    "InstructionLLM": dict(positional_encoding="none"),
    "HybridModel": dict(positional_encoding="none"),
    "EfficientInstructionLLM": dict(positional_encoding="none", causal_encoder=True),
}
# the plain classes build sequence-first torch layers, which warn that they cannot use nested tensors
pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: more threads only contend (the machine is shared)."""
    with torch_threads(1):
        yield


@pytest.mark.parametrize("class_name", CLASSES)
def test_plain_state_dict_loads_strictly(class_name, tmp_path):
    torch.manual_seed(0)
    plain = getattr(plain_models, class_name)(**PLAIN_ARGS[class_name])
    torch.save(plain.state_dict(), tmp_path / "model.pt")
    config = ModelConfig(class_name, dict(PLAIN_ARGS[class_name], **PLAIN_OPTIONS.get(class_name, {})), TOKENS)
    (tmp_path / "s2s_model.json").write_text(json.dumps(config.to_dict()))

    checkpoint = load_checkpoint(tmp_path)

    assert type(checkpoint.model) is models.MODEL_CLASSES[class_name]
    loaded = checkpoint.model.state_dict()
    assert loaded.keys() == plain.state_dict().keys()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("class_name", ["EncoderDecoder", "InstructionLLM", "HybridModel", "EfficientInstructionLLM"])
def test_plain_math_kept_where_it_is_defined(class_name):
    """The README's settings reproduce the plain forward where it does not depend on its flaws: no
    padding, and (for the decoders the plain versions leave non-causal) a single target position."""
    torch.manual_seed(0)
    plain = getattr(plain_models, class_name)(**PLAIN_ARGS[class_name]).eval()
    ours = models.MODEL_CLASSES[class_name](**PLAIN_ARGS[class_name], **PLAIN_OPTIONS.get(class_name, {})).eval()
    ours.load_state_dict(plain.state_dict(), strict=True)
    causal_plain = class_name in ("EncoderDecoder", "EfficientInstructionLLM")  # the plain decoder is causal
    src = torch.randint(3, VOCAB, (6, 3))
    tgt = torch.randint(3, VOCAB, (5 if causal_plain else 1, 3))
    if class_name == "EncoderDecoder":  # batch-first
        src, tgt = src.T, tgt.T
    with torch.no_grad():
        torch.testing.assert_close(ours(src, tgt), plain(src, tgt), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("class_name", CLASSES)
def test_cached_step_equals_full_forward(class_name):
    """Step-by-step logits (cache from the encoder, empty self-attention cache at step 0) equal the
    teacher-forced forward of torch's own modules, on a padded batch."""
    model = random_model(class_name)
    input_ids, attention_mask = sample_batch()
    decoder_input_ids = torch.cat((torch.full((4, 1), TOKENS["decoder_start_token_id"]),
                                   torch.randint(3, VOCAB, (4, 7))), dim=1)
    specs = {s.input_name: s for s in model.state_specs()}
    with torch.no_grad():
        expected = model.full_forward(input_ids, attention_mask, decoder_input_ids)
        encoded = model.encode(input_ids, attention_mask)
        encoder_inputs = {"encoder_attention_mask": attention_mask,
                          "encoder_hidden_states": encoded["last_hidden_state"]}
        states = model.start_states(encoded)
        stepped = []
        for position in range(decoder_input_ids.shape[1]):
            logits, present = model.step(decoder_input_ids[:, position:position + 1], encoder_inputs, states)
            stepped.append(logits[:, 0])
            states.update({name: present[s.output_name] for name, s in specs.items() if s.output_name})
    # float32 through a few layers, sums in another order; these logits reach ~10 in magnitude
    torch.testing.assert_close(torch.stack(stepped, dim=1), expected, rtol=1e-4, atol=1e-4)


class PrefixAdapter(nn.Module):
    """The models/ generation interface over a transformers seq2seq model, without a cache: the state is
    the decoder prefix (it grows along axis 1) and every step reruns it. Lets the reference search run on
    a model that transformers' own `generate` also runs."""

    step_inputs = ("encoder_attention_mask", "encoder_hidden_states")

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model

    def state_specs(self):
        return (StateTensor("prefix", "present.prefix", batch_axis=0, seq_axis=1, kind="grows"),)

    def encode(self, input_ids, attention_mask):
        hidden = self.hf_model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return {"last_hidden_state": hidden}

    def start_states(self, encoded):
        return {"prefix": torch.zeros(encoded["last_hidden_state"].shape[0], 0, dtype=torch.int64)}

    def step(self, input_ids, encoder_inputs, states):
        prefix = torch.cat((states["prefix"], input_ids), dim=1)
        logits = self.hf_model(encoder_outputs=(encoder_inputs["encoder_hidden_states"],),
                               attention_mask=encoder_inputs["encoder_attention_mask"],
                               decoder_input_ids=prefix, use_cache=False).logits
        return logits[:, -1:], {"present.prefix": prefix}


@pytest.fixture(scope="module")
def tiny_t5():
    """A random T5 (tiny, built in milliseconds) and a padded batch; EOS's output row is scaled so that
    some rows end early and others run to the limit."""
    from transformers import T5Config, T5ForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                          relative_attention_num_buckets=8, initializer_factor=2.0, tie_word_embeddings=False,
                          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        model = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight[1] *= 2.5
    input_ids, attention_mask = sample_batch()
    return model, input_ids, attention_mask


@pytest.mark.parametrize("options", [
    dict(num_beams=1),
    dict(num_beams=4, num_return_sequences=2),
    dict(num_beams=3, length_penalty=0.5, early_stopping=True),
    dict(num_beams=3, num_return_sequences=3, length_penalty=2.0, early_stopping="never"),
])
def test_reference_generate_equals_transformers(tiny_t5, options):
    hf_model, input_ids, attention_mask = tiny_t5
    with torch.no_grad():
        expected = hf_model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=15,
                                     do_sample=False, **options)
    got = generate(PrefixAdapter(hf_model), input_ids, attention_mask, max_new_tokens=15, decoder_start_token_id=0,
                   eos_token_id=1, pad_token_id=0, **options)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("class_name", CLASSES)
def test_saved_checkpoint_round_trips(class_name, tmp_path):
    model = random_model(class_name)
    save_checkpoint(model, ModelConfig(class_name, ARGS[class_name], TOKENS), tmp_path)
    loaded = load_checkpoint(tmp_path).model
    input_ids, attention_mask = sample_batch()
    options = dict(max_new_tokens=MAX_NEW_TOKENS, num_beams=2, **TOKENS)
    torch.testing.assert_close(generate(loaded, input_ids, attention_mask, **options),
                               generate(model, input_ids, attention_mask, **options), rtol=0, atol=0)
