"""models/ checkpoints through s2s-export: the graphs follow the contract, ONNX logits equal PyTorch's
(full forward and cached step, from an empty self-attention cache), and the runtime's greedy and beam
search return the tokens of the models/ reference generate."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import runtime
from exporter import export
from exporter.sources.custom import load_source
from models.generate import generate
from runtime.manifest import GREEDY_BIAS, LOGITS_ROWS, NEXT_IDS, SEQLENS_K, TOTAL_SEQUENCE_LENGTH, Manifest
from tests.custom_models import CLASSES, MAX_NEW_TOKENS, TOKENS, VOCAB, sample_batch, torch_threads, write_checkpoint

pytestmark = pytest.mark.slow  # exports models/ checkpoints


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """class name -> (source, export dir) for every architecture, exported once with s2s-export's API
    (which validates logits and greedy tokens against PyTorch before it writes the directory)."""
    result = {}
    with torch_threads(1):
        for class_name in CLASSES:
            root = tmp_path_factory.mktemp(class_name)
            checkpoint = write_checkpoint(class_name, root / "checkpoint")
            report = export(checkpoint, root / "export")
            assert report.validation.tokens_match and all(c.ok for c in report.validation.comparisons)
            result[class_name] = load_source(checkpoint), report.output
    return result


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: more threads only contend (the machine is shared)."""
    with torch_threads(1):
        yield


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("class_name", CLASSES)
def test_graphs_follow_the_contract(exported, class_name):
    source, out = exported[class_name]
    manifest = Manifest.read(out)
    decoder = _session(out / manifest.decoder_file)
    encoder = _session(out / manifest.encoder_file)
    inputs = [i.name for i in decoder.get_inputs()]
    assert inputs[0] == "input_ids" and decoder.get_inputs()[0].shape[1] == 1
    lengths = {SEQLENS_K, TOTAL_SEQUENCE_LENGTH} if any(s.kind == "buffer" for s in manifest.states) else set()
    head = {LOGITS_ROWS, GREEDY_BIAS} if manifest.greedy_head else set()
    assert set(inputs[1:]) == set(source.model.step_inputs) | {s.input_name for s in manifest.states} | lengths | head
    assert [i.name for i in encoder.get_inputs()] == ["input_ids", "attention_mask"]
    assert {s.encoder_output for s in manifest.states if s.init == "encoder"} <= {o.name for o in encoder.get_outputs()}
    assert manifest.source == "custom" and manifest.model_type == class_name and manifest.vocab_size == VOCAB
    assert (manifest.pad_token_id, manifest.decoder_start_token_id, manifest.eos_token_ids) == (
        TOKENS["pad_token_id"], TOKENS["decoder_start_token_id"], (TOKENS["eos_token_id"],))


@pytest.mark.parametrize("class_name", CLASSES)
def test_onnx_logits_equal_pytorch(exported, class_name):
    """Encoder, then decoder steps fed back by hand from step 0 (a self-attention cache of length 0, or
    a zeroed buffer of every position when the kv-buffer pass ran), against the teacher-forced forward
    of torch's modules; batch size and lengths differ from the trace's."""
    source, out = exported[class_name]
    manifest = Manifest.read(out)
    encoder, decoder = _session(out / manifest.encoder_file), _session(out / manifest.decoder_file)
    input_ids, attention_mask = (t.numpy() for t in sample_batch(batch=3, src_len=8, seed=1))
    decoder_input_ids = np.concatenate([np.full((3, 1), TOKENS["decoder_start_token_id"]),
                                        np.random.default_rng(0).integers(3, VOCAB, (3, 6))], axis=1)
    hidden, expected = source.reference().forward(input_ids, attention_mask, decoder_input_ids)

    encoded = dict(zip([o.name for o in encoder.get_outputs()],
                       encoder.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})))
    np.testing.assert_allclose(encoded["last_hidden_state"], hidden, rtol=1e-4, atol=1e-5)
    shapes = {i.name: i.shape for i in decoder.get_inputs()}
    states = {}
    for s in manifest.states:
        if s.init == "encoder":
            states[s.input_name] = encoded[s.encoder_output]
        else:  # empty along the growing axis (a buffer: every position); the other dims are fixed in the graph
            length = decoder_input_ids.shape[1] if s.kind == "buffer" else 0
            states[s.input_name] = np.zeros([3 if axis == s.batch_axis else (dim if isinstance(dim, int) else length)
                                             for axis, dim in enumerate(shapes[s.input_name])], np.float32)
    feeds = {"encoder_attention_mask": attention_mask, "encoder_hidden_states": encoded["last_hidden_state"]}
    output_names = [o.name for o in decoder.get_outputs()]
    stepped = []
    for position in range(decoder_input_ids.shape[1]):
        step_feeds = {name: value for name, value in dict(feeds, **states).items() if name in shapes}
        step_feeds["input_ids"] = decoder_input_ids[:, position:position + 1]
        if SEQLENS_K in shapes:  # positions written before this step, and with it
            step_feeds[SEQLENS_K] = np.full(3, position, dtype=np.int32)
            step_feeds[TOTAL_SEQUENCE_LENGTH] = np.array(position + 1, dtype=np.int32)
        if LOGITS_ROWS in shapes:  # a greedy head: its ids (no logits rows) are the logits' argmax
            vocab = shapes[GREEDY_BIAS][0]
            head = dict(step_feeds, **{LOGITS_ROWS: np.zeros(1, np.int64), GREEDY_BIAS: np.zeros(vocab, np.float32)})
            step_feeds.update({LOGITS_ROWS: np.array([3], np.int64), GREEDY_BIAS: head[GREEDY_BIAS]})
            next_ids = decoder.run([NEXT_IDS], head)[0][:, 0]
        results = dict(zip(output_names, decoder.run(None, step_feeds)))
        stepped.append(results["logits"][:, 0])
        if LOGITS_ROWS in shapes:
            np.testing.assert_array_equal(next_ids, results["logits"][:, 0].argmax(axis=-1))
        states.update({s.input_name: results[s.output_name] for s in manifest.states if s.output_name})
    # float32, other kernels and summation order; these logits reach ~10 in magnitude
    np.testing.assert_allclose(np.stack(stepped, axis=1), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options", [dict(num_beams=1), dict(num_beams=4, num_return_sequences=2),
                                     dict(num_beams=3, length_penalty=0.6, early_stopping=True)],
                         ids=["greedy", "beam4x2", "beam3-lp-early"])
@pytest.mark.parametrize("class_name", CLASSES)
def test_runtime_generate_equals_reference(exported, class_name, options):
    source, out = exported[class_name]
    input_ids, attention_mask = sample_batch()
    expected = generate(source.model, input_ids, attention_mask, max_new_tokens=MAX_NEW_TOKENS, **TOKENS, **options)
    model = runtime.load(out, provider="cpu", threads=1)
    got = model.generate(input_ids.numpy(), attention_mask.numpy(), max_new_tokens=MAX_NEW_TOKENS, **options)
    np.testing.assert_array_equal(got, expected.numpy())
