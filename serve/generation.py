"""Run one batch of compatible requests on the model (in the batcher's worker thread).

`batch_key(request)` says which requests may share one generate call: the same options, except what
differs per row without changing any row's tokens. Greedy and sampling requests of different
`max_new_tokens` share a call (each row is ended at its own limit) unless a forced EOS depends on
the length; sampling requests of different seeds share one (each row draws from its own RNG, see
`Model.stream_steps`). Beam search needs every option equal.

`run_batch(model, texts, jobs)` generates for `jobs` and calls each job's `emit` with its events:
`Token`s (streaming jobs only), then a `GenerationResult`; or a `ServeError` if generation raised.
Padding never changes tokens: rows are padded on the right with a mask, as `Model.generate_text`
pads, and a row's answer is what that input alone gets.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np

from runtime import Model
from serve.backend import GenerationResult, Sequence, Token
from serve.detokenize import RowText, TokenTexts
from serve.schema import GenerateRequest, ServeError

log = logging.getLogger("serve.generation")

Event = Token | GenerationResult | ServeError


@dataclass(eq=False)
class Job:
    """One request on its way through the batcher."""

    request: GenerateRequest
    emit: Callable[[Event], None]  # thread-safe: hands an event to the request's waiting coroutine
    cancelled: bool = False  # set from the event loop when the client leaves; read here between steps


def batch_key(request: GenerateRequest) -> Hashable:
    """Requests with equal keys can run in one generate call and get the tokens each would get alone."""
    options = request.options
    if options.num_beams > 1:
        return ("beam", dataclasses.replace(options, seed=None))
    if options.do_sample and options.num_return_sequences > 1:
        return ("alone", object())  # several samples share one RNG: only this request's rows may draw from it
    if options.forced_eos_token_id is None:  # else the forced EOS position depends on the length
        options = dataclasses.replace(options, max_length=0, max_new_tokens=None)
    return ("steps", dataclasses.replace(options, seed=None))


def batch_rows(request: GenerateRequest) -> int:
    """Decoder rows a request takes: one per beam, or per returned sample."""
    return request.options.num_beams * (1 if request.options.num_beams > 1 else request.options.num_return_sequences)


def run_batch(model: Model, texts: TokenTexts, jobs: list[Job]) -> None:
    """Generate for jobs sharing one batch_key; every job gets its events through `emit`."""
    jobs = [job for job in jobs if not job.cancelled]
    if not jobs:
        return
    pending = set(range(len(jobs)))  # jobs not yet answered
    try:
        if jobs[0].request.options.num_beams > 1:
            _run_beams(model, texts, jobs, pending)
        else:
            _run_steps(model, texts, jobs, pending)
    except Exception as err:  # noqa: BLE001 - any failure must answer every waiting request, then the server goes on
        log.exception("generation failed for a batch of %d request(s)", len(jobs))
        failure = ServeError.generation(f"{type(err).__name__}: {err}")
        for index in pending:
            jobs[index].emit(failure)


def _padded_inputs(model: Model, jobs: list[Job], repeat: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids, attention_mask: [len(jobs) * repeat, longest] int64, padded on the right."""
    ids = [job.request.input_ids for job in jobs for _ in range(repeat)]
    longest = max(len(seq) for seq in ids)
    input_ids = np.full((len(ids), longest), model.manifest.pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(ids), longest), dtype=np.int64)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = seq
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


class _Row:
    """One decoder row of a step-by-step batch: its tokens so far and why it ended."""

    def __init__(self, job_index: int, limit: int, texts: TokenTexts | None):
        self.job_index = job_index
        self.limit = limit  # new tokens this row may generate (its request's max_new_tokens)
        self.text = RowText(texts) if texts is not None else None  # None: no token text needed
        self.ids: list[int] = []
        self.tokens: list[Token] = []
        self.finish: str | None = None


def _run_steps(model: Model, texts: TokenTexts, jobs: list[Job], pending: set[int]) -> None:
    """Greedy search or sampling, token by token, every job's rows in one call of Model.stream_steps."""
    first = jobs[0].request
    repeat = first.options.num_return_sequences  # > 1 only for a request alone in its batch (see batch_key)
    input_ids, attention_mask = _padded_inputs(model, jobs, repeat)
    rows_of_job = [list(range(j * repeat, (j + 1) * repeat)) for j in range(len(jobs))]
    rows = [_Row(j, job.request.max_new_tokens,
                 texts if job.request.stream or job.request.details or job.request.stop else None)
            for j, job in enumerate(jobs) for _ in range(repeat)]
    options = dict(first.overrides, max_new_tokens=max(row.limit for row in rows), num_return_sequences=1)
    row_seeds = None
    if first.options.do_sample:
        if repeat == 1:
            row_seeds = [job.request.seed for job in jobs]
            options["seed"] = None
        else:
            options["seed"] = first.seed
    eos = set(first.options.eos_token_ids)
    stop_rows: set[int] = set()
    steps = model.stream_steps(input_ids, attention_mask, logprobs=any(job.request.details for job in jobs),
                               stop_rows=stop_rows, row_seeds=row_seeds, **options)
    try:
        for step in steps:
            ended_jobs = set()
            for index, row in enumerate(rows):
                if row.finish is not None or index in stop_rows:
                    continue
                job = jobs[row.job_index]
                if job.cancelled:
                    stop_rows.add(index)
                    ended_jobs.add(row.job_index)
                    continue
                token_id = int(step.ids[index])
                row.ids.append(token_id)
                text = row.text.push(token_id) if row.text is not None else ""
                logprob = float(step.logprobs[index]) if job.request.details else None
                row.tokens.append(Token(token_id, text, logprob, token_id in texts.special))
                if token_id in eos:
                    row.finish = "eos_token"
                elif job.request.stop and _stopped(job.request.stop, row.text.text, text):
                    row.finish = "stop_sequence"
                elif len(row.ids) >= row.limit:
                    row.finish = "length"
                if row.finish is not None:
                    stop_rows.add(index)
                    ended_jobs.add(row.job_index)
                elif job.request.stream:
                    job.emit(row.tokens[-1])
            for j in sorted(ended_jobs & pending):
                if jobs[j].cancelled:
                    pending.discard(j)
                elif all(rows[r].finish is not None for r in rows_of_job[j]):
                    pending.discard(j)
                    sequences = tuple(Sequence(texts.decode(rows[r].ids), tuple(rows[r].tokens), rows[r].finish)
                                      for r in rows_of_job[j])
                    jobs[j].emit(_result(texts, jobs[j].request, sequences))
            if not pending:
                break
    finally:
        steps.close()


def _stopped(stop: tuple[str, ...], text: str, added: str) -> bool:
    """Whether a stop sequence now appears in the text, in the part the last token could have completed."""
    return bool(added) and any(s in text[-(len(s) + len(added)):] for s in stop)


def _run_beams(model: Model, texts: TokenTexts, jobs: list[Job], pending: set[int]) -> None:
    """Beam search for every job at once (equal options), through Model.generate_with_scores."""
    first = jobs[0].request
    input_ids, attention_mask = _padded_inputs(model, jobs, 1)
    result = model.generate_with_scores(input_ids, attention_mask, **first.overrides)
    scores = None
    if any(job.request.details for job in jobs):
        scores = model.token_scores(input_ids, attention_mask, result.sequences, **first.overrides)
    eos = set(first.options.eos_token_ids)
    answers = first.options.num_return_sequences
    for j, job in enumerate(jobs):
        sequences = []
        for row in range(j * answers, (j + 1) * answers):
            generated = [int(t) for t in result.sequences[row, 1:]]
            ended = next((i for i, t in enumerate(generated) if t in eos), None)
            if ended is not None:
                generated = generated[: ended + 1]
            row_text = RowText(texts)
            tokens = tuple(Token(t, row_text.push(t), float(scores[row, i]) if scores is not None else None,
                                 t in texts.special) for i, t in enumerate(generated))
            sequences.append(Sequence(texts.decode(generated), tokens, "eos_token" if ended is not None else "length"))
        pending.discard(j)
        if not job.cancelled:
            job.emit(_result(texts, job.request, tuple(sequences)))


def _result(texts: TokenTexts, request: GenerateRequest, sequences: tuple[Sequence, ...]) -> GenerationResult:
    start = texts.decoder_start_token_id
    return GenerationResult(sequences=sequences, seed=request.seed, input_length=len(request.input_ids),
                            decoder_start=Token(start, texts.special.get(start, ""), None, True))
