"""TGI's request and response shapes, and the one place every request parameter is checked.

Text Generation Inference (huggingface/text-generation-inference, router/src/lib.rs and validation.rs)
is the contract, so existing clients (`huggingface_hub.InferenceClient.text_generation`) work unchanged:

    request   {"inputs": str, "parameters": {...}, "stream": bool}         ("stream" read by POST / only)
    response  {"generated_text": str, "details": {...}}                    (details only when asked)
    error     {"error": str, "error_type": "validation" | "overloaded" | "generation" | ...}

`RequestValidator.validate(body, stream=...)` turns a parsed JSON body into a `GenerateRequest`, or
raises `ServeError` (422 for a bad parameter, with TGI's wording where TGI has the parameter). A
parameter the runtime cannot honour is refused, never dropped; TGI parameters at their "off" value
(`watermark: false`, `best_of: 1`, `top_n_tokens: 0`, ...) are accepted and ignored, as TGI does.
What a request leaves out comes from the export's generation_config.json, as in transformers (so a
T5 export generates 20 new tokens unless told otherwise, not TGI's 100).

Differences from TGI, each deliberate: `truncate: N` keeps the first N - 1 tokens and the closing EOS
(the runtime's and transformers' right-side truncation, which keeps a T5 task prefix), where TGI keeps
the last N; a token's `logprob` is computed only with `details: true` (null otherwise); `top_k: 0`
and `top_p: 1.0` are accepted as "off"; generation failures answer 500 (TGI: 424).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from runtime import Model
from runtime.errors import InvalidInputError, InvalidOptionError
from runtime.options import GenerationOptions

FINISH_REASONS = ("length", "eos_token", "stop_sequence")

# this runtime's own generation options a request may set, beside TGI's (validated by GenerationOptions)
RUNTIME_PARAMETERS = ("num_beams", "num_return_sequences", "length_penalty", "early_stopping",
                      "no_repeat_ngram_size", "min_new_tokens", "bad_words_ids")
# TGI parameters accepted only at the value that turns them off (what TGI does with them then: nothing)
OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "watermark": (False,),
    "best_of": (1,),
    "top_n_tokens": (0,),
    "frequency_penalty": (0, 0.0),
    "typical_p": (),
    "grammar": (),
    "adapter_id": (),
}
TGI_PARAMETERS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed",
                  "stop", "truncate", "details", "decoder_input_details", "return_full_text")
KNOWN_PARAMETERS = frozenset(TGI_PARAMETERS + RUNTIME_PARAMETERS + tuple(OFF_VALUES))
SEED_LIMIT = 2**64  # TGI's seeds are u64


class ServeError(Exception):
    """An error answered as TGI's `{"error": ..., "error_type": ...}` with an HTTP status."""

    def __init__(self, message: str, error_type: str, status: int):
        super().__init__(message)
        self.message, self.error_type, self.status = message, error_type, status

    def __reduce__(self):  # pickled with its fields (a Ray Serve replica's error travels to the ingress)
        return (type(self), (self.message, self.error_type, self.status))

    @classmethod
    def validation(cls, problem: str, status: int = 422) -> ServeError:
        return cls(f"Input validation error: {problem}", "validation", status)

    @classmethod
    def overloaded(cls) -> ServeError:
        return cls("Model is overloaded", "overloaded", 429)

    @classmethod
    def generation(cls, problem: str) -> ServeError:
        return cls(f"Request failed during generation: {problem}", "generation", 500)

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}


@dataclass(frozen=True)
class GenerateRequest:
    """A validated request: everything a backend needs, nothing left to parse or check."""

    inputs: str
    input_ids: tuple[int, ...]  # the tokenized input (after truncate), EOS included
    overrides: dict[str, Any]  # generate kwargs the request set: Model.generate_text(inputs, **overrides)
    options: GenerationOptions  # overrides resolved over the export's generation_config
    stream: bool
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool = False
    stop: tuple[str, ...] = ()
    seed: int | None = None  # the sampling seed (given or drawn here); None without sampling

    @property
    def max_new_tokens(self) -> int:
        return self.options.total_max_length() - 1


class RequestValidator:
    """Checks requests against one loaded model: its tokenizer, generation defaults and limits."""

    def __init__(self, model: Model, max_input_tokens: int, max_stop_sequences: int = 4):
        self.model = model
        self.max_input_tokens = max_input_tokens
        self.max_stop_sequences = max_stop_sequences

    def validate(self, body: Any, *, stream: bool | None) -> GenerateRequest:
        """body: the parsed JSON. stream: what the route means (None: POST /, which reads body["stream"]).

        Raises:
            ServeError: 422 naming the first thing wrong with the request.
        """
        if not isinstance(body, dict):
            raise ServeError.validation(f"expected a JSON object {{\"inputs\": ..., \"parameters\": ...}}, "
                                        f"found {_json_type(body)}")
        unknown = sorted(set(body) - {"inputs", "parameters", "stream"})
        if unknown:
            raise ServeError.validation(f"unknown field(s) {unknown}; a request has `inputs`, `parameters` "
                                        "and (POST /) `stream`")
        wants_stream = body.get("stream", False)
        if not isinstance(wants_stream, bool):
            raise ServeError.validation(f"`stream` must be true or false, found {_json_type(wants_stream)}")
        if stream is None:
            stream = wants_stream
        elif "stream" in body and wants_stream != stream:
            raise ServeError.validation(f"`stream: {str(wants_stream).lower()}` contradicts this route; "
                                        "use POST /generate_stream to stream, POST /generate not to")
        inputs = body.get("inputs")
        if not isinstance(inputs, str):
            raise ServeError.validation(f"`inputs` must be a string, found {_json_type(inputs)}")
        if not inputs.strip():
            raise ServeError.validation("`inputs` cannot be empty")
        parameters = body.get("parameters")
        if parameters is None:
            parameters = {}
        if not isinstance(parameters, dict):
            raise ServeError.validation(f"`parameters` must be an object, found {_json_type(parameters)}")
        return self._validate_parameters(inputs, parameters, stream)

    def _validate_parameters(self, inputs: str, params: dict[str, Any], stream: bool) -> GenerateRequest:
        unknown = sorted(set(params) - KNOWN_PARAMETERS)
        if unknown:
            raise ServeError.validation(f"unknown parameter(s) {unknown}; known: {sorted(KNOWN_PARAMETERS)}")
        params = {k: v for k, v in params.items() if v is not None}  # null means "not given", as in TGI
        _check_off_values(params)

        overrides: dict[str, Any] = {}
        if "max_new_tokens" in params:
            overrides["max_new_tokens"] = _integer(params, "max_new_tokens", 1, "must be strictly positive")
        if "temperature" in params:
            overrides["temperature"] = _number(params, "temperature", lambda v: v > 0, "must be strictly positive")
        if "repetition_penalty" in params:
            overrides["repetition_penalty"] = _number(params, "repetition_penalty", lambda v: v > 0,
                                                      "must be strictly positive")
        if "top_k" in params:
            overrides["top_k"] = _integer(params, "top_k", 0, "must be >= 0 (0 turns top-k off)")
        if "top_p" in params:
            overrides["top_p"] = _number(params, "top_p", lambda v: 0 < v <= 1, "must be > 0.0 and <= 1.0")
        if "seed" in params:
            seed = _integer(params, "seed", 0, "must be >= 0 and < 2**64")
            if seed >= SEED_LIMIT:
                raise ServeError.validation("`seed` must be >= 0 and < 2**64")
            overrides["seed"] = seed
        flags = {name: _boolean(params, name) for name in ("details", "decoder_input_details", "return_full_text")
                 if name in params}
        for name in RUNTIME_PARAMETERS:
            if name in params:
                overrides[name] = params[name]
        overrides.update(_sampling_switch(params, overrides))
        stop = _stop_sequences(params, self.max_stop_sequences)

        try:
            options = self.model.options(**overrides)
        except InvalidOptionError as err:
            raise ServeError.validation(str(err)) from None
        details = flags.get("details", False)
        decoder_input_details = flags.get("decoder_input_details", False)
        if stream:
            if options.num_beams > 1:
                raise ServeError.validation("beam search (num_beams > 1) cannot stream: a beam's tokens are final "
                                            "only at the end; use POST /generate")
            if options.num_return_sequences > 1:
                raise ServeError.validation("`num_return_sequences` > 1 is not supported when streaming tokens")
            if decoder_input_details:
                raise ServeError.validation("`decoder_input_details` == true is not supported when streaming tokens")
        if options.num_return_sequences > 1 and not details:
            raise ServeError.validation("`num_return_sequences` > 1 needs `details: true`: the other sequences "
                                        "come back in details.best_of_sequences")
        if stop and options.num_beams > 1:
            raise ServeError.validation("`stop` needs greedy search or sampling (num_beams = 1): beam search cannot "
                                        "end one hypothesis early")

        truncate = _integer(params, "truncate", 1, "must be strictly positive") if "truncate" in params else None
        if truncate is not None and truncate > self.max_input_tokens:
            raise ServeError.validation(f"`truncate` must be strictly positive and less than {self.max_input_tokens}. "
                                        f"Given: {truncate}")
        input_ids = self._tokenize(inputs, truncate)

        seed = None
        if options.do_sample:
            # TGI draws a seed for unseeded sampling and reports it, so a client can replay the answer
            seed = options.seed if options.seed is not None else random.SystemRandom().randrange(SEED_LIMIT)
            overrides["seed"] = seed
            options = self.model.options(**overrides)
        return GenerateRequest(inputs=inputs, input_ids=input_ids, overrides=overrides, options=options, stream=stream,
                               details=details, decoder_input_details=decoder_input_details,
                               return_full_text=flags.get("return_full_text", False), stop=stop, seed=seed)

    def _tokenize(self, inputs: str, truncate: int | None) -> tuple[int, ...]:
        try:
            ids, _, _ = self.model.text.encode([inputs])
        except InvalidInputError as err:
            raise ServeError.validation(str(err)) from None
        tokens = [int(t) for t in ids[0]]
        if truncate is not None and len(tokens) > truncate:
            # keep the closing special token (EOS), like the runtime's own truncation
            tokens = tokens[: truncate - 1] + tokens[-1:] if truncate > 1 else tokens[:1]
        if len(tokens) > self.max_input_tokens:
            raise ServeError.validation(f"`inputs` must have at most {self.max_input_tokens} tokens. Given: "
                                        f"{len(tokens)}; shorten it or set `truncate`")
        return tuple(tokens)


def _check_off_values(params: dict[str, Any]) -> None:
    for name, off in OFF_VALUES.items():
        if name not in params:
            continue
        value = params[name]
        if any(value == v and type(value) is type(v) for v in off):
            continue
        if name == "best_of":
            raise ServeError.validation(f"`best_of` must be > 0 and <= 1. Given: {value!r} (best_of > 1 is not "
                                        "supported; use num_return_sequences with details)")
        if name == "top_n_tokens":
            raise ServeError.validation(f"`top_n_tokens` must be >= 0 and <= 0. Given: {value!r}")
        raise ServeError.validation(f"`{name}` is not supported (found {value!r}); leave it out")
    for name in OFF_VALUES:
        params.pop(name, None)


def _sampling_switch(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """TGI's rule (NextTokenChooser in server/text_generation_server/utils/tokens.py):
    `sampling = do_sample or has_warpers`, a warper being a request's temperature != 1.0, top_k != 0 or
    top_p < 1.0. So such a value samples even beside `do_sample: false`, which TGI's own Python client
    sends with every request. A request that sets neither do_sample nor a warper samples as the export's
    generation_config says."""
    warping = [name for name, off in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0))
               if name in overrides and overrides[name] != off]  # top_p is <= 1.0 here: != 1.0 is < 1.0
    if "do_sample" in params:
        return {"do_sample": _boolean(params, "do_sample") or bool(warping)}
    return {"do_sample": True} if warping else {}


def _stop_sequences(params: dict[str, Any], limit: int) -> tuple[str, ...]:
    stop = params.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ServeError.validation("`stop` must be a list of non-empty strings")
    if len(stop) > limit:
        raise ServeError.validation(f"`stop` supports up to {limit} stop sequences. Given: {len(stop)}")
    return tuple(stop)


def _integer(params: dict[str, Any], name: str, minimum: int, rule: str) -> int:
    value = params[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ServeError.validation(f"`{name}` must be an integer, found {_json_type(value)}")
    if value < minimum:
        raise ServeError.validation(f"`{name}` {rule}. Given: {value}")
    return value


def _number(params: dict[str, Any], name: str, ok, rule: str) -> float:
    value = params[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ServeError.validation(f"`{name}` must be a number, found {_json_type(value)}")
    if not ok(value):
        raise ServeError.validation(f"`{name}` {rule}. Given: {value}")
    return float(value)


def _boolean(params: dict[str, Any], name: str) -> bool:
    value = params[name]
    if not isinstance(value, bool):
        raise ServeError.validation(f"`{name}` must be true or false, found {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return "a string"
    return {"list": "an array", "dict": "an object"}.get(type(value).__name__, type(value).__name__)


# -- responses ------------------------------------------------------------------------------------------
def token_body(token: Any) -> dict[str, Any]:
    """serve.backend.Token -> TGI's Token {id, text, logprob, special}."""
    return {"id": token.id, "text": token.text, "logprob": token.logprob, "special": token.special}


def generate_body(request: GenerateRequest, result: Any) -> dict[str, Any]:
    """TGI's GenerateResponse for a serve.backend.GenerationResult."""
    best, *others = result.sequences
    body: dict[str, Any] = {"generated_text": _full_text(request, best.text)}
    if request.details:
        details: dict[str, Any] = {
            "finish_reason": best.finish_reason,
            "generated_tokens": len(best.tokens),
            "seed": result.seed,
            "prefill": _prefill(request, result),
            "tokens": [token_body(t) for t in best.tokens],
        }
        if others:
            details["best_of_sequences"] = [{
                "generated_text": _full_text(request, seq.text),
                "finish_reason": seq.finish_reason,
                "generated_tokens": len(seq.tokens),
                "seed": result.seed,
                "prefill": _prefill(request, result),
                "tokens": [token_body(t) for t in seq.tokens],
            } for seq in others]
        body["details"] = details
    return body


def stream_token_body(token: Any, index: int) -> dict[str, Any]:
    """An intermediate server-sent event of /generate_stream (index counts from 1, as in TGI)."""
    return {"index": index, "token": token_body(token), "generated_text": None, "details": None}


def stream_end_body(request: GenerateRequest, result: Any) -> dict[str, Any]:
    """The last server-sent event: the last token, the whole text, and (with details) the stream details."""
    best = result.sequences[0]
    details = None
    if request.details:
        details = {"finish_reason": best.finish_reason, "generated_tokens": len(best.tokens), "seed": result.seed,
                   "input_length": result.input_length}
    return {"index": len(best.tokens), "token": token_body(best.tokens[-1]),
            "generated_text": _full_text(request, best.text), "details": details}


def _full_text(request: GenerateRequest, text: str) -> str:
    return request.inputs + text if request.return_full_text else text


def _prefill(request: GenerateRequest, result: Any) -> list[dict[str, Any]]:
    """The decoder's input: for an encoder-decoder, its start token alone (TGI gives it no logprob)."""
    if not request.decoder_input_details:
        return []
    start = result.decoder_start
    return [{"id": start.id, "text": start.text, "logprob": None}]


def info_body(model: Model, *, max_input_tokens: int, max_stop_sequences: int, max_concurrent_requests: int,
              max_batch_size: int, max_batch_tokens: int, max_wait_ms: float) -> dict[str, Any]:
    """GET /info: TGI's Info fields where they apply (model_id, model_dtype, model_device_type,
    max_input_length, max_concurrent_requests, ...) and this server's own."""
    from runtime.manifest import installed_versions

    manifest = model.manifest
    versions = installed_versions(("s2s", "onnxruntime", "onnxruntime-gpu", "numpy", "tokenizers", "starlette",
                                   "uvicorn"))
    return {
        "model_id": model.export_dir.name,
        "model_type": manifest.model_type,
        "export_dir": str(model.export_dir),
        "model_dtype": manifest.precision,
        "model_device_type": model.provider,
        "model_pipeline_tag": "text2text-generation",
        "max_input_tokens": max_input_tokens,
        "max_input_length": max_input_tokens,
        "max_total_tokens": max_input_tokens + manifest.max_target_positions if manifest.max_target_positions else None,
        "max_concurrent_requests": max_concurrent_requests,
        "max_best_of": 1,
        "max_stop_sequences": max_stop_sequences,
        "max_batch_size": max_batch_size,
        "max_batch_total_tokens": max_batch_tokens,
        "max_wait_ms": max_wait_ms,
        "router": "s2s-serve",
        "version": versions.get("s2s", "unknown"),
        "versions": versions,
    }
