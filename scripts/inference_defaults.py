"""Measure decode speed of the bundled model under OpenMP wait policies and thread
counts: the evidence for the inference commands' defaults (`rgemma.defaults`).

Each setting runs in a fresh process (OMP_WAIT_POLICY is read when torch loads
OpenMP), greedy, one prompt, and reports decode tokens/s (wall) and the process CPU
seconds per token; settings alternate over rounds so that other jobs on a shared
machine hit them alike. Prints a table and the CPU model.

    python scripts/inference_defaults.py [--rounds 3] [--tokens 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

CHILD = r"""
import json, os, sys, time, resource
import torch
torch.set_num_threads(int(sys.argv[1]))
import rgemma
model, tok = rgemma.load()
n = int(sys.argv[2])
rgemma.generate(model, tok, ["Warm up"], max_new_tokens=8)
ids = tok.encode("It is a truth universally acknowledged")
c0, t0 = time.process_time(), time.perf_counter()
r = rgemma.generate(model, tok, [ids], max_new_tokens=n, ignore_eos=True)[0]
c1, t1 = time.process_time(), time.perf_counter()
print(json.dumps({"tok_s": n / r.decode_seconds, "cpu_ms_per_tok": 1e3 * (c1 - c0) / n}))
"""

SETTINGS = [  # (label, OMP_WAIT_POLICY or None for unset, threads)
    ("unset, 2 threads", None, 2),
    ("ACTIVE, 2 threads", "ACTIVE", 2),
    ("PASSIVE, 2 threads", "PASSIVE", 2),
    ("unset, 1 thread", None, 1),
    ("PASSIVE, 1 thread", "PASSIVE", 1),
]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=200)
    args = ap.parse_args()
    results: dict[str, list[dict]] = {label: [] for label, _, _ in SETTINGS}
    for _ in range(args.rounds):
        for label, policy, threads in SETTINGS:
            env = dict(os.environ)
            env.pop("OMP_WAIT_POLICY", None)
            if policy:
                env["OMP_WAIT_POLICY"] = policy
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(threads), str(args.tokens)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            results[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; load average {os.getloadavg()}")
    print(f"bundled model, greedy decode of {args.tokens} tokens, {args.rounds} rounds alternated")
    print(f"{'setting':<22} {'decode tok/s (median, min-max)':>32} {'CPU ms/token':>14}")
    for label, rs in results.items():
        tps = [r["tok_s"] for r in rs]
        cpu = statistics.median(r["cpu_ms_per_tok"] for r in rs)
        span = f"{statistics.median(tps):7.1f} ({min(tps):.1f}-{max(tps):.1f})"
        print(f"{label:<22} {span:>32} {cpu:14.2f}")


if __name__ == "__main__":
    main()
