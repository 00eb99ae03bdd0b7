"""Hugging Face encoder-decoders (a `save_pretrained` directory), exported with optimum's ONNX exporter.

No code per architecture: optimum's exporter knows every seq2seq LM it supports (T5, BART, Marian,
Pegasus, mBART, M2M100, LongT5, Blenderbot, ...), and the manifest is derived from the graphs it
writes (runtime/optimum_layout.py), exactly as for a directory written by `optimum-cli export onnx`.

Layout: optimum writes the encoder, the first-step decoder and the cached decoder, deduplicates tied
weights, and merges the two decoders into `decoder_model_merged.onnx`. The passes (optimize, fp16,
int8) work on the split graphs, because onnxruntime's optimizer cannot read the merged graph's If
node and quantizing it would store each weight twice; so the merged file is dropped after export.
`finish` then builds the final layout from the split graphs, weights stored once either way:

- by default `encoder.onnx` + `decoder.onnx` (exporter/passes/cross_kv.py): the encoder also emits the
  cross-attention K/V (computed once per input), the decoder is the cached graph run from an empty
  cache: no first-step graph, and no If node, inside whose branches onnxruntime fuses less;
- where that pass refuses (it says why, and the export notes record it), optimum's layout: the two
  decoders merged back into `decoder_model_merged.onnx`.
"""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from exporter.errors import SourceModelError
from exporter.progress import Steps
from runtime.errors import UnsupportedModelError, first_line
from runtime.json_file import read_json_object
from runtime.manifest import Manifest
from runtime.optimum_layout import (
    FIRST_STEP_FILE,
    MERGED_DECODER_FILE,
    WITH_PAST_FILE,
    manifest_from_optimum_dir,
)

TASK = "text2text-generation-with-past"

# Two sentences of different lengths, so validation sees a padded batch.
SAMPLE_TEXTS = (
    "translate English to German: The old bridge near the station was repaired last winter.",
    "summarize: Anna reads a book.",
)

# optimum logs one line per graph it exports, in this order for encoder-decoders.
_SUBMODEL_LINE = re.compile(r"Exporting submodel (\d+)/(\d+)")
_SUBMODEL_NAMES = ("encoder", "decoder (first step)", "decoder (cached steps)")
_OPTIMUM_EXPORT_LOGGER = "optimum.exporters.onnx.convert"


def supported_model_types() -> list[str]:
    """Model types optimum's ONNX exporter supports for text-to-text generation with a cache."""
    import optimum.exporters.onnx.model_configs  # noqa: F401 - registers optimum's ONNX configs with TasksManager
    from optimum.exporters.tasks import TasksManager

    return sorted(TasksManager.get_supported_model_type_for_task(TASK, exporter="onnx"))


def load_source(model_dir: Path) -> HFSource:
    """Check the config names an exportable encoder-decoder, then load its weights.

    Raises:
        SourceModelError: config.json or the weights are unreadable, truncated or incomplete, config.json
            describes a model transformers cannot build, or the weights do not fit it.
        UnsupportedModelError: the model type is not an encoder-decoder optimum exports.
    """
    config = read_json_object(model_dir / "config.json", SourceModelError, "re-save the model with save_pretrained")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise SourceModelError(f"{model_dir / 'config.json'} has no model_type; re-save the model with "
                               "save_pretrained")
    supported = supported_model_types()
    if model_type not in supported:
        raise UnsupportedModelError(
            f"{model_type!r} is {_describe(model_type, config)}, not an encoder-decoder language model that "
            f"s2s-export can export; supported model types: {', '.join(supported)}"
        )
    _check_config(model_dir, config)
    return HFSource(model_dir, model_type)


def _check_config(model_dir: Path, config: dict[str, Any]) -> None:
    """Build the model config.json describes on the meta device (no memory, no weights: ~0.3 s for
    t5-large), so that a value transformers cannot use (`"d_model": "x"`, a negative size) is reported
    as a config.json problem before the weights are read.

    Raises:
        SourceModelError
    """
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    path = model_dir / "config.json"
    try:
        with torch.device("meta"):
            AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(model_dir))
    # What config classes and the modules they size raise for a value of the wrong type or range.
    except (TypeError, ValueError, ZeroDivisionError, RuntimeError) as err:
        suspects = "".join(f"; {key} is {value!r}, expected {expected}"
                           for key, value, expected in _mistyped_sizes(config)[:3])
        raise SourceModelError(f"{path} describes a model transformers cannot build ({type(err).__name__}: "
                               f"{first_line(err, 200)}){suspects}; correct config.json, or re-save the model with "
                               "save_pretrained") from None


def _mistyped_sizes(config: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(key, value, expected type) for each config.json value that is a string where the config class's
    default is a number, or a fraction where it is an integer: the likely culprits of a model that
    cannot be built. (None and lists pass: token ids may be either.)"""
    from transformers import CONFIG_MAPPING

    if config["model_type"] not in CONFIG_MAPPING:
        return []
    defaults = inspect.signature(CONFIG_MAPPING[config["model_type"]].__init__).parameters
    found = []
    for key, value in config.items():
        default = defaults[key].default if key in defaults else None
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            continue
        if isinstance(value, str) or (isinstance(value, float) and isinstance(default, int)):
            found.append((key, value, "an integer" if isinstance(default, int) else "a number"))
    return found


def _describe(model_type: str, config: dict[str, Any]) -> str:
    """What kind of model an unsupported model type is, for the error message."""
    from optimum.exporters.tasks import TasksManager

    if config.get("is_encoder_decoder"):
        return "an encoder-decoder that optimum cannot export for text-to-text generation"
    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")
    except KeyError:
        return "a model type optimum's ONNX exporter does not know"
    return "a decoder-only model" if "text-generation" in tasks else "an encoder-only model"


def _load_model(model_dir: Path) -> Any:
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForSeq2SeqLM

    try:
        model, info = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    # What transformers, safetensors and torch.load raise for a truncated, corrupt or missing weights file.
    except (OSError, ValueError, RuntimeError, EOFError, SafetensorError) as err:
        lines = [line.strip() for line in str(err).strip().splitlines()]
        # torch's load_state_dict: "Error(s) in loading state_dict for ...:" then one line per tensor.
        mismatch = next((line for line in lines if line.startswith("size mismatch for ")), None)
        if mismatch is not None:
            raise SourceModelError(
                f"the weights in {str(model_dir)!r} do not fit its config.json ({mismatch.rstrip('.')[:300]}); "
                "config.json was edited (e.g. vocab_size) or belongs to another checkpoint: restore it, or re-save "
                "the model with save_pretrained") from None
        raise SourceModelError(f"cannot load the weights in {str(model_dir)!r}: {first_line(err)}; the checkpoint "
                               "may be truncated or corrupt: re-save it with save_pretrained") from None
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise SourceModelError(
            f"the weights in {str(model_dir)!r} lack {len(missing)} tensor(s) the config needs (e.g. {missing[:3]}); "
            "the checkpoint is incomplete or belongs to another config: re-save it with save_pretrained"
        )
    return model.eval()


class _SubmodelProgress(logging.Handler):
    """Turns optimum's "Exporting submodel i/n" log lines into steps."""

    def __init__(self, steps: Steps):
        super().__init__(logging.INFO)
        self.steps = steps

    def emit(self, record: logging.LogRecord) -> None:
        match = _SUBMODEL_LINE.search(record.getMessage())
        if match is None:
            return
        index, count = int(match.group(1)), int(match.group(2))
        name = _SUBMODEL_NAMES[index - 1] if count == len(_SUBMODEL_NAMES) else f"graph {index}/{count}"
        self.steps.start(f"export {name}")


class HFSource:
    """A transformers seq2seq LM loaded in float32 (implements exporter.sources.Source)."""

    kind = "hf"

    def __init__(self, model_dir: Path, model_type: str):
        self.model_dir = model_dir
        self.model_type = model_type
        self.model = _load_model(model_dir)  # loaded here so that unreadable weights fail the "load" step
        self._vocab_size = self.model.config.get_text_config(decoder=True).vocab_size
        generation = self.model.generation_config
        eos = generation.eos_token_id if generation.eos_token_id is not None else self.model.config.eos_token_id
        self._eos_id = eos[0] if isinstance(eos, list) else eos
        self._pad_id = generation.pad_token_id if generation.pad_token_id is not None else self._eos_id
        self._special_ids = {t for t in (self._eos_id, self._pad_id, generation.bos_token_id,
                                         generation.decoder_start_token_id) if t is not None}

    def export_graphs(self, out_dir: Path, opset: int | None, steps: Steps) -> Manifest:
        from optimum.exporters.onnx import onnx_export_from_model

        logger = logging.getLogger(_OPTIMUM_EXPORT_LOGGER)
        handler, level = _SubmodelProgress(steps), logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            steps.start("save config and tokenizer")  # what optimum does before the first graph
            # Validation is ours (against the final graphs, after the passes); optimum also saves
            # config.json, generation_config.json and the tokenizer files (a fast tokenizer's tokenizer.json).
            onnx_export_from_model(self.model, output=out_dir, opset=opset, task=TASK, do_validation=False)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        steps.end()
        # optimum leaves the model's configs changed (use_cache, generation parameters moved): validation
        # reloads a pristine one, and this one is dropped to free its memory first.
        self.model = None
        (out_dir / MERGED_DECODER_FILE).unlink()  # rebuilt by finish() from the split graphs the passes rewrite
        return manifest_from_optimum_dir(out_dir)

    def finish(self, out_dir: Path, notes: list[str]) -> Manifest:
        """Move the cross-attention K/V into the encoder (encoder.onnx + decoder.onnx); where that pass
        refuses, note why and merge the two decoders into one graph instead. Either way the split
        graphs are deleted and the weights are stored once."""
        from optimum.onnx import merge_decoders

        from exporter.passes.cross_kv import CrossAttentionNotMovable, move_cross_attention_to_encoder

        try:
            return move_cross_attention_to_encoder(out_dir)
        except CrossAttentionNotMovable as refusal:
            notes.append(f"kept optimum's merged decoder layout: the cross-attention K/V cannot move to the "
                         f"encoder ({refusal})")
        # strict=False: the cached graph does not re-emit cross-attention K/V (optimum merges seq2seq so).
        merge_decoders(decoder=out_dir / FIRST_STEP_FILE, decoder_with_past=out_dir / WITH_PAST_FILE,
                       save_path=out_dir / MERGED_DECODER_FILE, strict=False)
        for name in (FIRST_STEP_FILE, WITH_PAST_FILE):
            for path in out_dir.glob(name + "*"):  # the graph and any external-data file beside it
                path.unlink()
        return manifest_from_optimum_dir(out_dir)

    def reference(self) -> HFReference:
        return HFReference(_load_model(self.model_dir))

    def sample_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        except (OSError, ValueError):  # no tokenizer files: validate on random ids instead
            return self._random_inputs()
        if tokenizer.pad_token_id is None:
            return self._random_inputs()
        batch = tokenizer(list(SAMPLE_TEXTS), padding=True, return_tensors="np")
        input_ids = batch["input_ids"].astype(np.int64)
        if input_ids.max() >= self._vocab_size:  # a tokenizer larger than the model's embedding: not ours to fix
            return self._random_inputs()
        return input_ids, batch["attention_mask"].astype(np.int64)

    def _random_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """Two rows of 9 and 5 random ordinary tokens, each ending in EOS, padded on the right."""
        ordinary = np.setdiff1d(np.arange(self._vocab_size), sorted(self._special_ids))
        rng = np.random.default_rng(0)
        lengths = (9, 5)
        input_ids = np.full((len(lengths), max(lengths)), self._pad_id, dtype=np.int64)
        attention_mask = np.zeros_like(input_ids)
        for row, length in enumerate(lengths):
            input_ids[row, :length - 1] = rng.choice(ordinary, size=length - 1)
            input_ids[row, length - 1] = self._eos_id
            attention_mask[row, :length] = 1
        return input_ids, attention_mask


class HFReference:
    """The transformers model as validation's reference (implements exporter.sources.TorchReference)."""

    def __init__(self, model: Any):
        self.model = model

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                decoder_input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                             decoder_input_ids=torch.from_numpy(decoder_input_ids), use_cache=False)
        return out.encoder_last_hidden_state.float().numpy(), out.logits.float().numpy()

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
        import torch

        with torch.no_grad():
            tokens = self.model.generate(input_ids=torch.from_numpy(input_ids),
                                         attention_mask=torch.from_numpy(attention_mask),
                                         max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
        return tokens.numpy()
