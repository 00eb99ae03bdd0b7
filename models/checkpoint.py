"""The checkpoint directory of a models/ model: what `s2s-export` and `s2s-train` read and write.

    s2s_model.json      {"class": "EfficientInstructionLLM",
                         "args": {"vocab_size": 320, "d_model": 128, "nhead": 4, "num_layers": 2,
                                  "positional_encoding": "sinusoidal"},
                         "special_tokens": {"pad_token_id": 0, "decoder_start_token_id": 1, "eos_token_id": 2},
                         "generation": {"max_new_tokens": 16}}          # optional generate defaults
    model.safetensors   the state_dict (or model.pt: `torch.save(model.state_dict(), "model.pt")`)
    tokenizer.json      optional: a `tokenizers` tokenizer (its post-processor appends EOS to inputs)

"args" are the class's constructor arguments, keyword options included; the weights must match them
exactly (strict=True). "special_tokens" names the tokens the class uses (its `special_tokens`): the
three above for an encoder-decoder, pad and EOS for a decoder-only model, and none for the regressor
SimpleEncoderDecoder, whose s2s_model.json then has only "class" and "args". Every problem raises
`CheckpointError` (or `UnsupportedModelError` for an unknown class) with a message that names the
field or parameter and how to fix it.
"""

from __future__ import annotations

import inspect
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import MODEL_CLASSES
from runtime.errors import S2SError, UnsupportedModelError, first_line
from runtime.json_file import read_json_object

CONFIG_NAME = "s2s_model.json"
SAFETENSORS_NAME = "model.safetensors"
PT_NAME = "model.pt"
TOKENIZER_NAME = "tokenizer.json"


class CheckpointError(S2SError):
    """A models/ checkpoint is incomplete, or its s2s_model.json and its weights disagree."""


@dataclass(frozen=True)
class ModelConfig:
    class_name: str
    args: dict[str, Any]  # constructor arguments
    special_tokens: dict[str, int]  # the class's `special_tokens` by name ({} for the regressor)
    generation: dict[str, Any] = field(default_factory=dict)  # generate defaults (transformers' names)

    @classmethod
    def from_dict(cls, raw: Any, where: str = CONFIG_NAME) -> ModelConfig:
        """Check the JSON's structure and every argument's type against the class's constructor.

        Raises:
            UnsupportedModelError: "class" names no model of models/.
            CheckpointError: a missing, unknown or mistyped field or argument.
        """
        if not isinstance(raw, dict):
            raise CheckpointError(f"{where}: expected a JSON object, found {type(raw).__name__}")
        unknown = sorted(set(raw) - {"class", "args", "special_tokens", "generation"})
        if unknown:
            raise CheckpointError(f"{where}: unknown field(s) {unknown}; expected class, args, special_tokens "
                                  "and optionally generation")
        for name in ("class", "args"):
            if name not in raw:
                raise CheckpointError(f"{where}: missing field {name!r} (see models/README.md for the format)")
        class_name = raw["class"]
        if class_name not in MODEL_CLASSES:
            raise UnsupportedModelError(f"{where}: class {class_name!r} is not a models/ architecture; "
                                        f"expected one of {sorted(MODEL_CLASSES)}")
        expected_tokens = MODEL_CLASSES[class_name].special_tokens
        if expected_tokens and "special_tokens" not in raw:
            raise CheckpointError(f"{where}: missing field 'special_tokens' (see models/README.md for the format)")
        if not expected_tokens and raw.get("generation"):
            raise CheckpointError(f"{where}: {class_name} generates no tokens, so it takes no 'generation' defaults; "
                                  "remove the field")
        for name in ("args", "special_tokens", "generation"):
            if not isinstance(raw.get(name, {}), dict):
                raise CheckpointError(f"{where}: {name!r} must be a JSON object, found {type(raw[name]).__name__}")
        args = dict(raw["args"])
        _check_args(MODEL_CLASSES[class_name], args, where)
        tokens = dict(raw.get("special_tokens", {}))
        missing = [n for n in expected_tokens if n not in tokens]
        extra = sorted(set(tokens) - set(expected_tokens))
        if missing or extra:
            raise CheckpointError(f"{where}: {class_name}'s special_tokens must have exactly {list(expected_tokens)}; "
                                  f"missing {missing}, unknown {extra}")
        for name, value in tokens.items():
            if type(value) is not int or not 0 <= value < args["vocab_size"]:
                raise CheckpointError(f"{where}: special_tokens.{name} must be an int in [0, vocab_size="
                                      f"{args['vocab_size']}), found {value!r}")
        return cls(class_name, args, tokens, dict(raw.get("generation", {})))

    def to_dict(self) -> dict[str, Any]:
        out = {"class": self.class_name, "args": self.args}
        if self.special_tokens or MODEL_CLASSES[self.class_name].special_tokens:
            out["special_tokens"] = self.special_tokens
        if self.generation:
            out["generation"] = self.generation
        return out

    def build(self) -> nn.Module:
        """A freshly initialised model of this config (train mode, like any nn.Module)."""
        try:
            return MODEL_CLASSES[self.class_name](**self.args)
        except ValueError as err:  # the constructors' own checks (divisibility, choices)
            raise CheckpointError(f"cannot build {self.class_name} from its args: {err}") from None


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: ModelConfig
    model: nn.Module  # in eval mode, weights loaded
    tokenizer_file: Path | None  # tokenizer.json beside the weights, if any


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def read_config(path: str | Path) -> ModelConfig:
    config_path = Path(path) / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{str(path)!r} has no {CONFIG_NAME}: it is not a models/ checkpoint "
                              "(write one with models.checkpoint.save_checkpoint or s2s-train)")
    raw = read_json_object(config_path, CheckpointError, "write it again (models.checkpoint.save_checkpoint)")
    return ModelConfig.from_dict(raw, where=str(config_path))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint directory: config, model with its weights loaded strictly, tokenizer path.

    Raises:
        UnsupportedModelError: the config names an unknown class.
        CheckpointError: missing or unreadable files, bad config, or weights that do not fit the config
            (missing or unexpected parameters, wrong shapes).
    """
    path = Path(path)
    config = read_config(path)
    model = config.build()
    state_dict, weights_name = _read_weights(path)
    _load_strict(model, state_dict, f"{weights_name} of {path}", config)
    tokenizer = path / TOKENIZER_NAME
    return Checkpoint(path, config, model.eval(), tokenizer if tokenizer.is_file() else None)


def save_checkpoint(model: nn.Module, config: ModelConfig, path: str | Path, tokenizer_json: str | None = None) -> Path:
    """Write s2s_model.json, model.safetensors and (given its JSON text) tokenizer.json into `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ModelConfig.from_dict(config.to_dict())  # never write a config that would not load
    # contiguous copies: safetensors refuses views and shared storage
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(path / SAFETENSORS_NAME))
    if tokenizer_json is not None:
        (path / TOKENIZER_NAME).write_text(tokenizer_json, encoding="utf-8")
    (path / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def _check_args(model_class: type[nn.Module], args: dict[str, Any], where: str) -> None:
    """Names and types of `args` against the constructor's signature and annotations."""
    params = {n: p for n, p in inspect.signature(model_class).parameters.items()}
    hints = typing.get_type_hints(model_class.__init__)
    unknown = sorted(set(args) - set(params))
    if unknown:
        raise CheckpointError(f"{where}: {model_class.__name__} takes no argument(s) {unknown}; "
                              f"its arguments are {list(params)}")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in args]
    if missing:
        raise CheckpointError(f"{where}: args lacks {missing}, required by {model_class.__name__}")
    for name, value in args.items():
        expected = hints[name]
        if expected is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:  # int, str, bool: exactly (JSON true is not an int here, 128.0 is not an int)
            ok = type(value) is expected
        if not ok:
            raise CheckpointError(f"{where}: args.{name} must be {expected.__name__}, found "
                                  f"{type(value).__name__} {value!r}")
        if expected is int and value < 1:
            raise CheckpointError(f"{where}: args.{name} must be >= 1, found {value}")
        if name == "dropout" and not 0 <= value < 1:
            raise CheckpointError(f"{where}: args.dropout must be in [0, 1), found {value}")


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    if (path / SAFETENSORS_NAME).is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path / SAFETENSORS_NAME)), SAFETENSORS_NAME
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path / SAFETENSORS_NAME} is not a readable safetensors file ({err}); "
                                  "it may be truncated: save it again") from None
    if (path / PT_NAME).is_file():
        try:
            state = torch.load(path / PT_NAME, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch.load raises many types for corrupt or unsafe files
            raise CheckpointError(f"{path / PT_NAME} cannot be read as a state_dict ({first_line(err)}); "
                                  "save it with torch.save(model.state_dict(), 'model.pt')") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path / PT_NAME} holds a {type(state).__name__}, not a state_dict of tensors; "
                                  "save it with torch.save(model.state_dict(), 'model.pt')")
        return state, PT_NAME
    raise CheckpointError(f"{str(path)!r} has no weights: expected {SAFETENSORS_NAME} or {PT_NAME} "
                          f"beside {CONFIG_NAME}")


def _load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], where: str, config: ModelConfig) -> None:
    """load_state_dict(strict=True), with a message that names the parameters and the fix."""
    described = f"{config.class_name}({', '.join(f'{k}={v!r}' for k, v in config.args.items())})"
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{where} does not match {described}: missing {_some(missing)}, unexpected {_some(unexpected)}; "
            f"the weights were saved from another class or other args: fix \"class\"/\"args\" in {CONFIG_NAME}")
    wrong = [f"{k} {list(state_dict[k].shape)} (model: {list(v.shape)})" for k, v in expected.items()
             if state_dict[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{where} has parameters of other shapes than {described}: {_some(wrong)}; "
                              f"set \"args\" in {CONFIG_NAME} to the sizes the weights were trained with")
    model.load_state_dict(state_dict, strict=True)


def _some(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return "[" + ", ".join(names[:limit]) + "]" + more
