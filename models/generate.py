"""The PyTorch reference generate of models/: greedy and beam search over a model's cached step.

Same tokens as transformers' `generate` would give for these models (and so as the s2s runtime):
greedy is `_sample` without sampling, beam search follows transformers 4.57's vectorized `_beam_search`
(its top-2K candidates, length penalty on finished hypotheses, early-stopping heuristic and output
padding). No logits processors: this is the oracle for plain greedy and beam search.

- `generate`: an encoder-decoder; the decoder starts from the decoder start token.
- `generate_from_prompt`: a decoder-only model continues a prompt. The prompt but its last token runs
  through the cache first (one call); the search then starts from the last token, exactly as from a
  start token: transformers' decoder-only lengths and length penalty count the tokens after the prompt,
  which is what the search counts after its start token. The prompt is put back in front of the result.
"""

from __future__ import annotations

import torch

from models import Seq2SeqModel
from models.decoder_only import TransformerLM
from runtime.manifest import ENCODER_ATTENTION_MASK, ENCODER_HIDDEN_STATES, LAST_HIDDEN_STATE, fed_back


@torch.no_grad()
def generate(model: Seq2SeqModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             decoder_start_token_id: int, eos_token_id: int | tuple[int, ...], pad_token_id: int,
             max_new_tokens: int = 20, num_beams: int = 1, num_return_sequences: int = 1,
             length_penalty: float = 1.0, early_stopping: bool | str = False) -> torch.Tensor:
    """input_ids, attention_mask: [batch, src_len] int64, padding on the right (mask None: no padding).

    Returns [batch * num_return_sequences, length] int64, starting with the decoder start token,
    padded after EOS.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    _check_search(num_beams, num_return_sequences)
    step = _Decoder(model, input_ids, attention_mask, num_beams)
    start_ids = torch.full((input_ids.shape[0],), decoder_start_token_id, dtype=torch.int64)
    return _search(step, start_ids, eos_token_id, pad_token_id, max_new_tokens, num_beams, num_return_sequences,
                   length_penalty, early_stopping)


@torch.no_grad()
def generate_from_prompt(model: TransformerLM, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                         eos_token_id: int | tuple[int, ...], pad_token_id: int, max_new_tokens: int = 20,
                         num_beams: int = 1, num_return_sequences: int = 1, length_penalty: float = 1.0,
                         early_stopping: bool | str = False) -> torch.Tensor:
    """A decoder-only model's continuation, like transformers' decoder-only `generate`.

    prompt_ids, attention_mask: [batch, prompt_len] int64, padding on the left (mask None: no padding).
    Returns [batch * num_return_sequences, prompt_len + new] int64: the prompt, then the new tokens,
    padded after EOS.

    Raises:
        ValueError: a row's last prompt token is padding (right padding), or a bad search setting.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(prompt_ids)
    if not bool((attention_mask[:, -1] == 1).all()):
        raise ValueError("a prompt's last token is padding: pad decoder-only prompts on the left")
    _check_search(num_beams, num_return_sequences)
    step = _PromptDecoder(model, prompt_ids, attention_mask, num_beams)
    continued = _search(step, prompt_ids[:, -1], eos_token_id, pad_token_id, max_new_tokens, num_beams,
                        num_return_sequences, length_penalty, early_stopping)
    head = prompt_ids[:, :-1].repeat_interleave(num_return_sequences, dim=0)
    return torch.cat((head, continued), dim=1)


def _check_search(num_beams: int, num_return_sequences: int) -> None:
    if num_beams == 1 and num_return_sequences != 1:
        raise ValueError("greedy search returns one sequence per input; use num_beams >= num_return_sequences")
    if num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences={num_return_sequences} must be <= num_beams={num_beams}")


def _search(step, start_ids: torch.Tensor, eos_token_id: int | tuple[int, ...], pad_token_id: int,
            max_new_tokens: int, num_beams: int, num_return: int, length_penalty: float,
            early_stopping: bool | str) -> torch.Tensor:
    """Greedy or beam search from start_ids ([batch] int64, one per input); step holds batch * num_beams rows."""
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    max_length = max_new_tokens + 1  # the start token included
    if num_beams == 1:
        return _greedy(step, start_ids, eos, pad_token_id, max_length)
    return _beam(step, start_ids, eos, pad_token_id, max_length, num_beams, num_return, length_penalty,
                 early_stopping)


class _Decoder:
    """The encoder outputs and decoder states of one call, rows = batch * beams."""

    def __init__(self, model: Seq2SeqModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, repeat: int):
        self.model = model
        self.specs = {s.input_name: s for s in model.state_specs()}
        encoded = model.encode(input_ids, attention_mask)
        states = model.start_states(encoded)
        # beam-major per input, like transformers' _expand_inputs_for_generation
        self.states = {name: v.repeat_interleave(repeat, dim=self.specs[name].batch_axis) for name, v in states.items()}
        self.encoder_inputs = {ENCODER_ATTENTION_MASK: attention_mask.repeat_interleave(repeat, dim=0),
                               ENCODER_HIDDEN_STATES: encoded[LAST_HIDDEN_STATE].repeat_interleave(repeat, dim=0)}

    def __call__(self, last_ids: torch.Tensor) -> torch.Tensor:
        """last_ids: [rows] int64 -> next-token logits [rows, vocab] float32; states advance one step."""
        logits, present = self.model.step(last_ids[:, None], self.encoder_inputs, self.states)
        for name, spec in self.specs.items():
            if spec.output_name is not None:
                self.states[name] = present[spec.output_name]
        return logits[:, -1, :].float()

    def select(self, rows: torch.Tensor) -> None:
        """Keep state rows `rows` ([rows] int64), in that order (beam reordering)."""
        self.states = {name: v.index_select(self.specs[name].batch_axis, rows) for name, v in self.states.items()}


class _PromptDecoder:
    """A decoder-only model's caches and attention mask for one call, rows = batch * beams; made with the
    prompt but its last token already in the cache."""

    def __init__(self, model: TransformerLM, prompt_ids: torch.Tensor, attention_mask: torch.Tensor, repeat: int):
        self.model = model
        self.specs = model.state_specs()
        prompt_ids = prompt_ids.repeat_interleave(repeat, dim=0)  # beam-major per input, like transformers
        self.mask = attention_mask.repeat_interleave(repeat, dim=0)[:, :-1]
        self.states = model.start_states(prompt_ids.shape[0])
        if prompt_ids.shape[1] > 1:
            _, present = model.step(prompt_ids[:, :-1], self.mask, self.states)
            self._keep(present)

    def _keep(self, present: dict[str, torch.Tensor]) -> None:
        self.states = {name: present[output] for name, output in fed_back(self.specs).items()}

    def __call__(self, last_ids: torch.Tensor) -> torch.Tensor:
        """last_ids: [rows] int64 -> next-token logits [rows, vocab] float32; the caches grow one position."""
        self.mask = torch.cat((self.mask, self.mask.new_ones(self.mask.shape[0], 1)), dim=1)
        logits, present = self.model.step(last_ids[:, None], self.mask, self.states)
        self._keep(present)
        return logits[:, -1, :].float()

    def select(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` ([rows] int64) of the caches and the mask, in that order."""
        self.mask = self.mask.index_select(0, rows)
        self.states = {name: v.index_select(0, rows) for name, v in self.states.items()}


def _greedy(step, start_ids, eos, pad_id, max_length) -> torch.Tensor:
    sequences = start_ids[:, None].clone()
    unfinished = torch.ones(start_ids.shape[0], dtype=torch.bool)
    while unfinished.any() and sequences.shape[1] < max_length:
        next_ids = step(sequences[:, -1]).argmax(dim=-1)
        next_ids = torch.where(unfinished, next_ids, pad_id)
        sequences = torch.cat((sequences, next_ids[:, None]), dim=1)
        unfinished &= ~torch.isin(next_ids, eos)
    return sequences


def _beam(step, start_ids, eos, pad_id, max_length, num_beams, num_return, length_penalty,
          early_stopping) -> torch.Tensor:
    batch, beams = start_ids.shape[0], num_beams
    keep = max(2, 1 + len(eos)) * beams  # candidates per input: enough to keep `beams` running after EOS
    fill = pad_id or int(eos[0])  # transformers' quirk: a pad id of 0 fills with EOS instead
    running = torch.full((batch, beams, max_length), fill, dtype=torch.int64)
    running[:, :, 0] = start_ids[:, None]
    finished_seqs = running.clone()
    running_scores = torch.zeros(batch, beams)
    running_scores[:, 1:] = -1e9  # only the first beam expands at step 0
    finished_scores = torch.full((batch, beams), -1e9)
    finished_lengths = torch.zeros(batch, beams, dtype=torch.int64)  # generated tokens, EOS included
    is_finished = torch.zeros(batch, beams, dtype=torch.bool)
    improvable = torch.ones(batch, 1, dtype=torch.bool)
    in_first_beams = torch.arange(keep) < beams
    cur_len = 1
    while True:
        logits = step(running[:, :, cur_len - 1].reshape(-1))  # [batch*beams, vocab]
        vocab = logits.shape[-1]
        log_probs = torch.log_softmax(logits, dim=-1).view(batch, beams, vocab) + running_scores[:, :, None]
        top_scores, top_index = torch.topk(log_probs.view(batch, beams * vocab), keep)  # [batch, keep]
        top_beam, top_token = top_index // vocab, top_index % vocab
        top_seqs = torch.take_along_dim(running, top_beam[:, :, None], dim=1)
        top_seqs[:, :, cur_len] = top_token
        ends = torch.isin(top_token, eos) | (cur_len + 1 >= max_length)

        # the best `beams` candidates that did not end keep running
        alive_scores = top_scores + ends.float() * -1e9
        pick = torch.topk(alive_scores, beams)[1]
        running = torch.take_along_dim(top_seqs, pick[:, :, None], dim=1)
        running_scores = torch.take_along_dim(alive_scores, pick, dim=1)
        parent_rows = (torch.take_along_dim(top_beam, pick, dim=1) + torch.arange(batch)[:, None] * beams).reshape(-1)

        # candidates among the first `beams` that ended may replace worse finished hypotheses
        ended_now = ends & in_first_beams[None, :]
        candidate = top_scores / ((cur_len + 1 - 1) ** length_penalty)
        candidate = candidate + (is_finished.all(dim=1, keepdim=True) & (early_stopping is True)).float() * -1e9
        candidate = candidate + (~improvable).float() * -1e9
        candidate = candidate + (~ended_now).float() * -1e9
        merged = torch.cat((finished_scores, candidate), dim=1)
        best = torch.topk(merged, beams)[1]
        finished_scores = torch.take_along_dim(merged, best, dim=1)
        finished_seqs = torch.take_along_dim(torch.cat((finished_seqs, top_seqs), dim=1), best[:, :, None], dim=1)
        finished_lengths = torch.take_along_dim(
            torch.cat((finished_lengths, torch.full((batch, keep), cur_len)), dim=1), best, dim=1)
        is_finished = torch.take_along_dim(torch.cat((is_finished, ended_now), dim=1), best, dim=1)

        step.select(parent_rows)
        cur_len += 1
        # could a running beam still beat the worst finished one? (transformers' heuristic, per early_stopping)
        best_length = max_length - 1 if early_stopping == "never" and length_penalty > 0 else cur_len - 1
        best_running = running_scores[:, :1] / (best_length ** length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], -1e9)
        improvable = improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
        all_done = bool(is_finished.all()) and early_stopping is True
        if not improvable.any() or all_done or bool(ends.all()):
            break

    sequences = finished_seqs[:, :num_return].reshape(batch * num_return, max_length)
    length = 1 + int(finished_lengths[:, :num_return].max())
    return sequences[:, :length]
