"""models/ decoder-only models and the regressor: plain checkpoints load strictly, the plain math is kept
where it is defined, the cached step equals the full forward, and the reference `generate_from_prompt`
(greedy and beam, left-padded prompts) equals transformers' decoder-only `generate`."""

from __future__ import annotations

import json

import pytest
import torch

import models
from models.checkpoint import ModelConfig, load_checkpoint, save_checkpoint
from models.generate import generate_from_prompt
from runtime.manifest import StateTensor
from tests import plain_models
from tests.custom_models import VOCAB, torch_threads
from tests.lm_models import (
    LM_ARGS,
    LM_CLASSES,
    LM_TOKENS,
    MAX_NEW_TOKENS,
    REGRESSOR_ARGS,
    random_lm,
    random_regressor,
    sample_prompts,
)

PLAIN_ARGS = {
    "SimpleDecoderOnly": dict(vocab_size=VOCAB, d_model=16, nhead=2, num_layers=2),
    "DecoderOnly": dict(vocab_size=VOCAB, hidden_size=16),
    "SimpleEncoderDecoder": dict(input_dim=3, hidden_dim=8, output_dim=2),
}
PLAIN_TOKENS = {"SimpleDecoderOnly": LM_TOKENS, "DecoderOnly": LM_TOKENS, "SimpleEncoderDecoder": {}}
pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: more threads only contend (the machine is shared)."""
    with torch_threads(1):
        yield


@pytest.mark.parametrize("class_name", list(PLAIN_ARGS))
def test_plain_state_dict_loads_strictly(class_name, tmp_path):
    torch.manual_seed(0)
    plain = getattr(plain_models, class_name)(**PLAIN_ARGS[class_name])
    torch.save(plain.state_dict(), tmp_path / "model.pt")
    config = ModelConfig(class_name, PLAIN_ARGS[class_name], PLAIN_TOKENS[class_name])
    (tmp_path / "s2s_model.json").write_text(json.dumps(config.to_dict()))

    checkpoint = load_checkpoint(tmp_path)

    assert type(checkpoint.model) is models.MODEL_CLASSES[class_name]
    loaded = checkpoint.model.state_dict()
    assert loaded.keys() == plain.state_dict().keys()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)


def test_regressor_checkpoint_has_no_tokens(tmp_path):
    save_checkpoint(random_regressor("projected"), ModelConfig("SimpleEncoderDecoder", REGRESSOR_ARGS["projected"], {}),
                    tmp_path)
    assert set(json.loads((tmp_path / "s2s_model.json").read_text())) == {"class", "args"}
    assert load_checkpoint(tmp_path).config.special_tokens == {}


@pytest.mark.parametrize("class_name", LM_CLASSES)
def test_decoder_only_plain_math_kept_at_one_position(class_name):
    """The plain versions attend without a mask: only a single position is defined the same way (with
    positional_encoding="none", the plain versions' order-blind math)."""
    torch.manual_seed(0)
    plain = getattr(plain_models, class_name)(**PLAIN_ARGS[class_name]).eval()
    ours = models.MODEL_CLASSES[class_name](**PLAIN_ARGS[class_name], positional_encoding="none").eval()
    ours.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randint(3, VOCAB, (1, 5))  # [seq=1, batch=5], sequence-first like the plain call
    with torch.no_grad():
        torch.testing.assert_close(ours(x), plain(x), rtol=1e-5, atol=1e-5)


def test_regressor_keeps_the_plain_math():
    torch.manual_seed(0)
    plain = plain_models.SimpleEncoderDecoder(**PLAIN_ARGS["SimpleEncoderDecoder"]).eval()
    ours = models.SimpleEncoderDecoder(**PLAIN_ARGS["SimpleEncoderDecoder"]).eval()
    ours.load_state_dict(plain.state_dict(), strict=True)
    src, trg = torch.randn(4, 6, 3), torch.randn(4, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(src, trg), plain(src, trg), rtol=0, atol=0)


@pytest.mark.parametrize("class_name", LM_CLASSES)
def test_cached_step_equals_full_forward(class_name):
    """The prompt in one call, then one position per call, through the cache, against torch's own modules
    on the whole left-padded sequence; and a padded row computes what it computes alone."""
    model = random_lm(class_name)
    ids, mask = sample_prompts(prompt_len=9)
    with torch.no_grad():
        expected = model.full_forward(ids, mask)
        states = model.start_states(ids.shape[0])
        chunks = [(0, 4)] + [(t, t + 1) for t in range(4, 9)]
        stepped = []
        for begin, end in chunks:
            logits, present = model.step(ids[:, begin:end], mask[:, :end], states)
            states = {s.input_name: present[s.output_name] for s in model.state_specs()}
            stepped.append(logits)
        alone = model.full_forward(ids[3:, 6:], mask[3:, 6:])  # row 3 without its 6 padding positions
    real = mask.bool()
    # float32 through a few layers, sums in another order; these logits reach ~20 in magnitude
    torch.testing.assert_close(torch.cat(stepped, dim=1)[real], expected[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(expected[3:, 6:], alone, rtol=1e-4, atol=1e-4)


def test_regressor_rollout_feeds_back_its_outputs():
    """rollout (step by step) equals the teacher-forced forward on the inputs it fed itself: start, then
    each output (fed-back), or each output's projection (projected)."""
    src = torch.randn(3, 5, 3)
    start = torch.randn(8)
    for variant, feedback in (("fed-back", None), ("projected", torch.nn.Linear(2, 8).eval())):
        model = random_regressor(variant)
        with torch.no_grad():
            outputs = model.rollout(src, 6, start=start, feedback=feedback)
            fed = outputs[:, :-1] if feedback is None else feedback(outputs[:, :-1])
            trg = torch.cat((start.expand(3, 1, 8), fed), dim=1)
            torch.testing.assert_close(outputs, model(src, trg), rtol=1e-5, atol=1e-6)


def test_regressor_rollout_needs_a_feedback_when_dims_differ():
    with pytest.raises(ValueError, match="output_dim=2 differs from hidden_dim=8: pass a feedback"):
        random_regressor("projected").rollout(torch.randn(1, 4, 3), 3)


def test_right_padded_prompts_are_refused():
    ids, mask = sample_prompts()
    with pytest.raises(ValueError, match="pad decoder-only prompts on the left"):
        generate_from_prompt(random_lm("SimpleDecoderOnly"), ids.flip(1), mask.flip(1), **LM_TOKENS)


class PrefixLM:
    """The models/ decoder-only interface over a transformers causal LM, without a cache: the state is the
    token prefix (it grows along axis 1) and every step reruns it, with transformers' own position ids for
    left padding. Lets the reference search run on a model that transformers' `generate` also runs."""

    def __init__(self, hf_model):
        self.hf_model = hf_model

    def state_specs(self):
        return (StateTensor("prefix", "present.prefix", batch_axis=0, seq_axis=1, kind="grows"),)

    def start_states(self, batch):
        return {"prefix": torch.zeros(batch, 0, dtype=torch.int64)}

    def step(self, input_ids, attention_mask, states):
        prefix = torch.cat((states["prefix"], input_ids), dim=1)
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        logits = self.hf_model(input_ids=prefix, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).logits
        return logits[:, -input_ids.shape[1]:], {"present.prefix": prefix}


@pytest.fixture(scope="module")
def tiny_gpt2():
    """A random GPT-2 (tiny, built in milliseconds) at a large init, so its outputs depend on the prompt;
    EOS's output row is scaled so that some rows end early and others run to the limit."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.3,
                            bos_token_id=LM_TOKENS["eos_token_id"], eos_token_id=LM_TOKENS["eos_token_id"],
                            pad_token_id=LM_TOKENS["pad_token_id"], tie_word_embeddings=False)
        model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.lm_head.weight[LM_TOKENS["eos_token_id"]] *= 3.0
    return model


@pytest.mark.parametrize("options", [
    dict(num_beams=1),
    dict(num_beams=4, num_return_sequences=2),
    dict(num_beams=3, length_penalty=0.5, early_stopping=True),
    dict(num_beams=3, num_return_sequences=3, length_penalty=2.0, early_stopping="never"),
])
def test_reference_generate_from_prompt_equals_transformers(tiny_gpt2, options):
    prompt_ids, attention_mask = sample_prompts()
    with torch.no_grad():
        expected = tiny_gpt2.generate(input_ids=prompt_ids, attention_mask=attention_mask,
                                      max_new_tokens=MAX_NEW_TOKENS, do_sample=False, **options)
    got = generate_from_prompt(PrefixLM(tiny_gpt2), prompt_ids, attention_mask, max_new_tokens=MAX_NEW_TOKENS,
                               **LM_TOKENS, **options)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    if options["num_beams"] == 1:  # the comparison covers rows that end early and rows that run to the limit
        ended = (got[:, prompt_ids.shape[1]:] == LM_TOKENS["eos_token_id"]).any(dim=1)
        assert ended.any() and not ended.all()


@pytest.mark.parametrize("class_name", LM_CLASSES)
def test_random_lm_outputs_vary(class_name):
    """The test models say something: greedy outputs differ across prompts, some rows end early."""
    prompt_ids, attention_mask = sample_prompts()
    sequences = generate_from_prompt(random_lm(class_name), prompt_ids, attention_mask,
                                     max_new_tokens=MAX_NEW_TOKENS, **LM_TOKENS)
    generated = sequences[:, prompt_ids.shape[1]:]
    assert len({tuple(row.tolist()) for row in generated}) == len(generated)
    assert (generated == LM_TOKENS["eos_token_id"]).any(dim=1).any()
    assert LM_ARGS[class_name]["vocab_size"] == VOCAB
