"""The contract between the HTTP app (serve/app.py) and whatever generates: a `GenerationBackend`.

The app validates a request into a `serve.schema.GenerateRequest`, hands it to the backend, and
formats what comes back; it never batches or touches the model. The backend does the rest:

    result = await backend.generate(request)             # -> GenerationResult
    async for event in backend.generate_stream(request): # -> Token, Token, ..., GenerationResult
        ...

`serve.batcher.Batcher` is the backend of `s2s-serve` (one process, dynamic batching in a worker
thread). Another backend (a Ray Serve deployment handle, say) mounts the same app and schema by
implementing these two methods. Both raise `serve.schema.ServeError` for failures a client is told
about (a failed generation: `ServeError.generation(...)`, answered 500); the app answers any other
exception as a 500 too, logging its traceback, since it is a bug. Cancellation is asyncio's:
when the client leaves, the app cancels the `generate` await or closes the `generate_stream`
iterator, and the backend stops (or drops) that request's generation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol

from serve.schema import GenerateRequest

FinishReason = Literal["length", "eos_token", "stop_sequence"]


@dataclass(frozen=True)
class Token:
    """One generated token: TGI's Token."""

    id: int
    text: str  # what this token adds to the text before the tokenizer's clean-up (serve/detokenize.py),
    #            "" while a multi-byte character is incomplete; a special token's own text ("</s>")
    logprob: float | None  # None unless the request asked for details
    special: bool


@dataclass(frozen=True)
class Sequence:
    """One answer: its text (decoded like Model.generate_text), its tokens and why it ended."""

    text: str
    tokens: tuple[Token, ...]  # the generated ids, the decoder start token excluded
    finish_reason: FinishReason


@dataclass(frozen=True)
class GenerationResult:
    """Everything generated for one request: one Sequence per num_return_sequences, best first."""

    sequences: tuple[Sequence, ...]
    seed: int | None  # the sampling seed, None for greedy and beam search
    input_length: int  # input tokens (after truncate)
    decoder_start: Token  # the decoder's input (TGI's "prefill" for an encoder-decoder)


class GenerationBackend(Protocol):
    async def generate(self, request: GenerateRequest) -> GenerationResult:
        """Generate the whole answer. Raises ServeError."""

    def generate_stream(self, request: GenerateRequest) -> AsyncIterator[Token | GenerationResult]:
        """Yield each token but the last as it is chosen, then the GenerationResult (whose first
        sequence ends with that last token). Greedy and sampling, one sequence. Raises ServeError."""
