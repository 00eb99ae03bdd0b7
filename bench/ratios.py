"""The ratios issue 10's goals are stated in, computed from the records of one run.

Paired ratios come from calls of the same round (bench/compare.py): record["latencies_ms"][r] of two
contestants of one case ran back to back, so their quotient is free of the load drifting between
rounds; the ratio reported is the median of the per-round quotients, with their p10 and p90.

Kinds (each an entry of results["ratios"]):
- "vs_best_peer": s2s's speed over the faster (by median) of optimum and CTranslate2 at the same
  precision and case: peer ms / s2s ms, paired. 2.0 = s2s takes half the time.
- "vs_eager": s2s's speed over eager PyTorch fp32 on the same device: eager ms / s2s ms, paired.
- "vs_fp32": s2s at a quantized precision over s2s fp32 in the same case: fp32 ms / that ms, paired.
- "batch_scaling": s2s tokens/s at a batch size over batch 1, same search, precision and lengths.
  Different cases run at different times, so this one is a ratio of medians, not paired.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.engines import BASELINE

SUBJECT = "s2s"
PEERS = ("optimum", "ct2")


def case_key(record: dict[str, Any]) -> tuple:
    return (record["model"], record["device"], record["num_beams"], record["batch_size"], record["src_len"],
            record["new_tokens"])


def paired_speedups(subject_ms: list[float], other_ms: list[float]) -> list[float]:
    """Per-round quotients other_ms[r] / subject_ms[r]: how many times faster the subject ran, round by round.

    subject_ms, other_ms: two contestants' timed calls of one case, in round order (the same rounds).

    Raises:
        ValueError: the lists have different lengths (they are not calls of the same rounds).
    """
    if len(subject_ms) != len(other_ms):
        raise ValueError(f"{len(subject_ms)} and {len(other_ms)} calls: not the same rounds")
    return [other / mine for mine, other in zip(subject_ms, other_ms)]


def _entry(kind: str, record: dict[str, Any], against: str, quotients: list[float], is_paired: bool
           ) -> dict[str, Any]:
    values = np.asarray(quotients)
    return {"kind": kind, "model": record["model"], "device": record["device"], "num_beams": record["num_beams"],
            "batch_size": record["batch_size"], "src_len": record["src_len"], "new_tokens": record["new_tokens"],
            "precision": record["precision"], "engine": SUBJECT, "against": against,
            "value": float(np.median(values)), "p10": float(np.percentile(values, 10)),
            "p90": float(np.percentile(values, 90)), "pairs": len(quotients) if is_paired else 0,
            "paired": is_paired}


def compute(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every ratio the records allow (see the module docstring), in the records' case order."""
    ok = [r for r in records if r["status"] == "ok" and r.get("latencies_ms")]
    cases: dict[tuple, dict[tuple[str, str], dict[str, Any]]] = {}
    for record in ok:
        cases.setdefault(case_key(record), {})[record["engine"], record["precision"]] = record
    out = []
    for by_engine in cases.values():
        for (name, precision), mine in by_engine.items():
            if name != SUBJECT:
                continue
            peers = [by_engine[peer, precision] for peer in PEERS if (peer, precision) in by_engine]
            if peers:
                best = min(peers, key=lambda r: r["median_ms"])
                out.append(_entry("vs_best_peer", mine, f"{best['engine']} {precision}",
                                  paired_speedups(mine["latencies_ms"], best["latencies_ms"]), True))
            eager = by_engine.get((BASELINE, "fp32"))
            if eager is not None:
                out.append(_entry("vs_eager", mine, f"{BASELINE} fp32",
                                  paired_speedups(mine["latencies_ms"], eager["latencies_ms"]), True))
            fp32 = by_engine.get((SUBJECT, "fp32"))
            if precision != "fp32" and fp32 is not None:
                out.append(_entry("vs_fp32", mine, f"{SUBJECT} fp32",
                                  paired_speedups(mine["latencies_ms"], fp32["latencies_ms"]), True))
    def same_work_but_batch(r: dict[str, Any]) -> tuple:
        return r["model"], r["device"], r["num_beams"], r["src_len"], r["new_tokens"], r["precision"]

    batch_one = {same_work_but_batch(r): r for r in ok if r["engine"] == SUBJECT and r["batch_size"] == 1}
    for record in ok:
        one = batch_one.get(same_work_but_batch(record))
        if record["engine"] == SUBJECT and record["batch_size"] > 1 and one is not None:
            out.append(_entry("batch_scaling", record, f"{SUBJECT} {record['precision']} batch 1",
                              [record["tokens_per_s"] / one["tokens_per_s"]], False))
    return out


def find(ratios: list[dict[str, Any]], kind: str, **where: Any) -> dict[str, Any] | None:
    """The first entry of `kind` whose fields equal `where`, or None."""
    for entry in ratios:
        if entry["kind"] == kind and all(entry.get(k) == v for k, v in where.items()):
            return entry
    return None
