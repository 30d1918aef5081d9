"""Summarize perf_analyzer's --profile-export-file: first-response latency of streamed requests.

    python perf/perf_analyzer/report.py MODEL PROFILE.json [--csv summary.csv]

perf_analyzer (2.41) measures a decoupled model's latency to its first response;
the export keeps every request's send time and its responses' arrival times,
from which this prints, per experiment (concurrency or request rate): first
response p50/p90/p95/p99, last response p50/p95, responses per request and the
gap between responses (llm: one delta is about one token). The export does not
say which responses carry data: for asr, whose chunks are mostly finished by
the next chunk with a flags-only FINAL, pass --min-responses 2 to keep only
the chunks that carried an event (event + that FINAL).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

FIELDS = ["model", "mode", "value", "requests", "answered", "responses_per_request",
          "first_p50_ms", "first_p90_ms", "first_p95_ms", "first_p99_ms", "last_p50_ms", "last_p95_ms",
          "gap_p50_ms", "throughput_per_s"]


def summarize(model: str, profile: dict, min_responses: int = 1) -> list[dict]:
    rows = []
    for experiment in profile["experiments"]:
        requests = experiment["requests"]
        answered = [r for r in requests if len(r["response_timestamps"]) >= min_responses]
        first = [(r["response_timestamps"][0] - r["timestamp"]) / 1e6 for r in answered]
        last = [(r["response_timestamps"][-1] - r["timestamp"]) / 1e6 for r in answered]
        gaps = [float(g) / 1e6 for r in answered for g in np.diff(r["response_timestamps"])]
        bounds = experiment.get("window_boundaries") or []
        span_s = (bounds[-1] - bounds[0]) / 1e9 if len(bounds) > 1 else None

        def p(values, q):
            return round(float(np.percentile(values, q)), 1) if values else None

        rows.append({"model": model, "mode": experiment["experiment"]["mode"],
                     "value": experiment["experiment"]["value"], "requests": len(requests),
                     "answered": len(answered),
                     "responses_per_request": round(sum(len(r["response_timestamps"]) for r in answered)
                                                    / max(len(answered), 1), 1),
                     "first_p50_ms": p(first, 50), "first_p90_ms": p(first, 90), "first_p95_ms": p(first, 95),
                     "first_p99_ms": p(first, 99), "last_p50_ms": p(last, 50), "last_p95_ms": p(last, 95),
                     "gap_p50_ms": p(gaps, 50),
                     "throughput_per_s": round(len(requests) / span_s, 2) if span_s else None})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("profile", type=Path)
    parser.add_argument("--csv", type=Path, help="append the rows to this CSV (header written when new)")
    parser.add_argument("--min-responses", type=int, default=1,
                        help="count only requests with at least this many responses (asr: 2)")
    args = parser.parse_args()
    rows = summarize(args.model, json.loads(args.profile.read_text()), args.min_responses)
    for row in rows:
        print("  " + ", ".join(f"{k}={v}" for k, v in row.items()))
    if args.csv:
        new = not args.csv.exists()
        with args.csv.open("a", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
