"""--step-cost: what one decoding step of the s2s runtime costs at past length 16 against 512.

The s2s workers (one per precision, interleaved call by call like every case) run at batch 1 with
STEP_COST_NEW_TOKENS new tokens asked for (min = max, so no row stops early). A step is one decoder
run plus the loop's own work of that step (logits rules, the search, feeding the cache back, a beam
reorder, any other graph it runs); its past length is the number of decoder runs before it. The cost
at a past length is the median over the window of steps past - HALF_WINDOW .. past + HALF_WINDOW.

- Greedy ("paired steps"): two token streams of the same call (bench/worker.py "steps"), one
  advanced to each window, are stepped in turn, so each step at past ~512 is timed right beside one
  at past ~16, the order alternating; the ratio is the median over these pairs.
- Beam search, which cannot stream ("within a call"): one call with every session.run recorded
  (bench/breakdown.py); a step runs from the start of one decoder-side run (a graph of
  DECODER_GRAPHS) to the start of the next. Both windows come from one call, some seconds apart;
  the ratio is taken per call, then the median over calls. The same ratio inside session.run alone
  is given beside it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PASTS = (16, 512)
HALF_WINDOW = 8  # a past length's cost: the median of its step and the 8 on either side
STEP_COST_NEW_TOKENS = max(PASTS) + HALF_WINDOW + 12  # the window's last step needs the next run's start
DECODER_GRAPHS = ("first_step", "decoder")  # S2SRunner.sessions() names; the encoder (and its graphs) run before
REQUEST = {"pasts": list(PASTS), "half_window": HALF_WINDOW}  # the worker's "steps" request fields


def step_times(call: dict[str, Any]) -> tuple[list[float], list[float]]:
    """One call's steps, index = past length: (whole step ms, ms inside session.run during the step).

    call: breakdown.split_call's dict (its "runs" in order, each with inside_ms and outside_before_ms).
    The last decoder-side run has no next start and yields no step.
    """
    starts, inside, clock = [], [], 0.0
    for run in call["runs"]:
        begin = clock + run["outside_before_ms"]
        clock = begin + run["inside_ms"]
        if run["graph"] in DECODER_GRAPHS:
            starts.append(begin)
            inside.append(0.0)
        if inside:  # any run after the first decoder-side run belongs to the current step
            inside[-1] += run["inside_ms"]
    whole = [later - earlier for earlier, later in zip(starts, starts[1:])]
    return whole, inside[:len(whole)]


def analyze(record: dict[str, Any]) -> dict[str, Any]:
    """The step-cost entry of one s2s record: from its step_calls (greedy) or breakdown_calls (beam).

    Returns the record's model, device, precision, num_beams, batch_size, src_len, new_tokens, plus
    method ("paired steps" | "within a call"), calls, step_ms ({past: ms}), ratio (largest past over
    smallest), ratio_p10, ratio_p90 (over pairs, or over calls), and for "within a call" inside_ms and
    inside_ratio (session.run only; None for "paired steps").

    Raises:
        ValueError: a call has too few steps for the largest past length's window.
    """
    entry = {k: record[k] for k in ("model", "device", "precision", "num_beams", "batch_size", "src_len",
                                    "new_tokens")}
    low, high = str(min(PASTS)), str(max(PASTS))
    if record.get("step_calls"):
        at = {past: [ms for call in record["step_calls"] for ms in call[past]] for past in (low, high)}
        ratios = np.array(at[high]) / np.array(at[low])
        entry.update(method="paired steps", calls=len(record["step_calls"]),
                     step_ms={p: float(np.median(ms)) for p, ms in at.items()}, inside_ms=None, inside_ratio=None)
    else:
        per_call = [call_windows(call) for call in record["breakdown_calls"]]
        ratios = np.array([c[high][0] / c[low][0] for c in per_call])
        entry.update(method="within a call", calls=len(per_call),
                     step_ms={p: float(np.median([c[p][0] for c in per_call])) for p in (low, high)},
                     inside_ms={p: float(np.median([c[p][1] for c in per_call])) for p in (low, high)},
                     inside_ratio=float(np.median([c[high][1] / c[low][1] for c in per_call])))
    entry.update(ratio=float(np.median(ratios)), ratio_p10=float(np.percentile(ratios, 10)),
                 ratio_p90=float(np.percentile(ratios, 90)))
    return entry


def call_windows(call: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """{past: (median whole step ms, median inside ms)} over each past length's window of one call."""
    whole, inside = step_times(call)
    if len(whole) <= max(PASTS) + HALF_WINDOW:
        raise ValueError(f"a call of {len(whole)} steps cannot show past {max(PASTS)} (+{HALF_WINDOW}); "
                         f"generate at least {max(PASTS) + HALF_WINDOW + 2} tokens")
    return {str(past): (float(np.median(whole[past - HALF_WINDOW:past + HALF_WINDOW + 1])),
                        float(np.median(inside[past - HALF_WINDOW:past + HALF_WINDOW + 1]))) for past in PASTS}
