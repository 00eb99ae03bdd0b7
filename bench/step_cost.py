"""--step-cost: what one decoding step of the s2s runtime costs at past length 16 against 512.

The s2s workers generate STEP_COST_NEW_TOKENS tokens (min = max, so no row stops early) with every
session.run recorded (bench/breakdown.py), the precisions interleaved call by call. In one call, the
k-th decoder-side run (a run of a graph in DECODER_GRAPHS: the first-step graph, then the with-past
decoder) sees a past of k tokens; a step is the time from the start of that run to the start of the
next, so the loop's own work of that step (logits rules, the search, feeding the cache back, a beam
reorder) and any other graph it runs count with it. Each call gives the median step over a window of
steps around each past length; the ratio 512 : 16 is taken within each call (both lengths come from
the same call, seconds apart), and the report gives the median over calls with p10 and p90.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PASTS = (16, 512)
HALF_WINDOW = 4  # a past length's cost: the median of its step and the 4 on either side
STEP_COST_NEW_TOKENS = max(PASTS) + HALF_WINDOW + 12  # the window's last step needs the next run's start
DECODER_GRAPHS = ("first_step", "decoder")  # S2SRunner.sessions() names; the encoder (and its graphs) run before


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
    """The step-cost entry of one s2s record whose breakdown_calls generated STEP_COST_NEW_TOKENS tokens.

    Returns the record's model, device, precision, num_beams, batch_size, src_len, new_tokens, plus
    calls, step_ms and inside_ms ({past: median over calls of the window median}), ratio (median over
    calls of step at the largest past / step at the smallest), ratio_p10, ratio_p90, inside_ratio.

    Raises:
        ValueError: a call has too few steps for the largest past length's window.
    """
    low, high = min(PASTS), max(PASTS)
    per_call = []
    for call in record["breakdown_calls"]:
        whole, inside = step_times(call)
        if len(whole) <= high + HALF_WINDOW:
            raise ValueError(f"a call of {len(whole)} steps cannot show past {high} (+{HALF_WINDOW}); "
                             f"generate at least {high + HALF_WINDOW + 2} tokens")
        per_call.append({past: (float(np.median(whole[past - HALF_WINDOW:past + HALF_WINDOW + 1])),
                                float(np.median(inside[past - HALF_WINDOW:past + HALF_WINDOW + 1])))
                         for past in PASTS})
    ratios = np.array([c[high][0] / c[low][0] for c in per_call])
    inside_ratios = np.array([c[high][1] / c[low][1] for c in per_call])
    entry = {k: record[k] for k in ("model", "device", "precision", "num_beams", "batch_size", "src_len",
                                    "new_tokens")}
    entry.update(calls=len(per_call),
                 step_ms={str(p): float(np.median([c[p][0] for c in per_call])) for p in PASTS},
                 inside_ms={str(p): float(np.median([c[p][1] for c in per_call])) for p in PASTS},
                 ratio=float(np.median(ratios)), ratio_p10=float(np.percentile(ratios, 10)),
                 ratio_p90=float(np.percentile(ratios, 90)), inside_ratio=float(np.median(inside_ratios)))
    return entry
