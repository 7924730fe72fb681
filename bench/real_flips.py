"""Which GSM8K answers the real-model tries flip, and whether different tries flip the same ones.

Each try of `bench/real_fre.py` changes between 117 and 150 of the 700 yardstick answers in either direction,
so its net difference is a small balance of two large flows. This reads the committed greedy prediction files
(the base's and each adapter's, all at the same prompt and cap), judges them again with `real_fre.judged`, and
prints per adapter the problems gained and lost, per pair of adapters how many problems both gained (and both
lost) beside the count expected were the flips independent, and how many adapters answer each problem right,
split by the base's answer. Problems that many adapters flip the same way are systematic; the rest are the
greedy answer's sensitivity to any small change of the weights.

    python bench/real_flips.py                       # the committed tries in bench/results/real_fre
    python bench/real_flips.py --adapter "try 7=runs/real-fre-t7/gsm8k-512/predictions/gsm8k/<name>-cot-512.jsonl"
    python bench/real_flips.py --json bench/results/real_fre/flips.json   # what flips.json holds
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_fre import REPO, judged  # noqa: E402

RESULTS = REPO / "bench" / "results" / "real_fre"
# name -> the adapter's greedy predictions at cap 512 (GSM8K's cot prompt), as committed
COMMITTED = {
    "try 2, seed 0": "try2-2026-12-03/real-fre-s0-eb4c3c94-cot-512.jsonl",
    "try 2, seed 1": "seed1-2026-12-03/real-fre-s1-6054520b-merged-cot-512.jsonl",
    "try 3": "try3-2026-12-03/real-fre-t3-s0-50115597-merged-cot-512.jsonl",
    "try 4": "try4-2026-12-03/real-fre-t4-s0-1a2821bd-merged-cot-512.jsonl",
    "try 5, seed 0": "predictions/real-fre-t5-s0-d1c44d71-merged-cot-512.jsonl",
    "try 5, seed 1": "seed1-demo-2026-12-04/real-fre-demo-s1-991fdb43-merged-cot-512.jsonl",
    "try 6": "try6-drgrpo-2026-12-04/real-fre-t6-d9069800-merged-cot-512.jsonl",
}
BASE = "predictions/base-cot-512.jsonl"


def flip_summary(base: dict[str, bool], adapters: dict[str, dict[str, bool]]) -> dict:
    """`base`: problem id -> the base answered right; `adapters`: name -> (id -> right), over the same ids.
    Per adapter gained/lost; per pair the problems both gained (lost) and the count independence would give
    (|gained_a| |gained_b| / problems the base missed; likewise for lost over those it solved); and, for the
    problems the base solved and those it missed, how many of them k adapters answer right, k = 0..len(adapters)."""
    ids = list(base)
    right, wrong = sum(base.values()), len(ids) - sum(base.values())
    gained = {name: {i for i in ids if a[i] and not base[i]} for name, a in adapters.items()}
    lost = {name: {i for i in ids if base[i] and not a[i]} for name, a in adapters.items()}
    pairs = [{"a": a, "b": b,
              "gained_both": len(gained[a] & gained[b]),
              "gained_both_if_independent": len(gained[a]) * len(gained[b]) / max(wrong, 1),
              "lost_both": len(lost[a] & lost[b]),
              "lost_both_if_independent": len(lost[a]) * len(lost[b]) / max(right, 1)}
             for a, b in itertools.combinations(adapters, 2)]
    by_base = {"base right": [0] * (len(adapters) + 1), "base wrong": [0] * (len(adapters) + 1)}
    for i in ids:
        by_base["base right" if base[i] else "base wrong"][sum(a[i] for a in adapters.values())] += 1
    return {"problems": len(ids), "base_right": right,
            "adapters": {name: {"right": sum(adapters[name].values()), "gained": len(gained[name]),
                                "lost": len(lost[name])} for name in adapters},
            "pairs": pairs, "adapters_right_per_problem": by_base}


def print_summary(s: dict) -> None:
    print(f"{s['problems']} problems, base right on {s['base_right']}")
    print(f"{'adapter':<16} {'right':>6} {'gained':>7} {'lost':>5}")
    for name, row in s["adapters"].items():
        print(f"{name:<16} {row['right']:>6} {row['gained']:>7} {row['lost']:>5}")
    print("\npairs: gained by both (if independent) | lost by both (if independent)")
    for p in s["pairs"]:
        print(f"  {p['a']:<14} & {p['b']:<14} {p['gained_both']:>4} ({p['gained_both_if_independent']:5.1f}) | "
              f"{p['lost_both']:>4} ({p['lost_both_if_independent']:5.1f})")
    print("\nproblems by the number of adapters that answer them right (0 .. all):")
    for key, counts in s["adapters_right_per_problem"].items():
        print(f"  {key:<10}: {counts}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="one more adapter's predictions at cap 512 (repeatable), beside the committed ones")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args()
    golds = json.loads((RESULTS / "eval.json").read_text())["problems"]
    files = {name: RESULTS / path for name, path in COMMITTED.items()}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file() or name in files:
            print(f"--adapter {item!r}: expected NEW_NAME=PATH to a predictions file", file=sys.stderr)
            return 2
        files[name] = Path(path)
    base = {i: r["score"] > 0 for i, r in judged(RESULTS / BASE, golds).items()}
    adapters = {}
    for name, path in files.items():
        try:
            records = judged(path, golds)
        except KeyError as err:
            print(f"{path}: a row without the field {err}", file=sys.stderr)
            return 2
        if set(records) != set(base):
            print(f"{path}: answers {len(records)} of the {len(base)} problems the base answers", file=sys.stderr)
            return 2
        adapters[name] = {i: records[i]["score"] > 0 for i in base}
    summary = flip_summary(base, adapters)
    print_summary(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
