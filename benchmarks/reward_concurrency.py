"""Reward scoring, sources one after another vs concurrently: wall time of one scoring call.

Every source takes 0.2 s per call: a plain function (``time.sleep``), an ``async def`` function
(``asyncio.sleep``) and a reward server on 127.0.0.1 (a real ``ThreadingHTTPServer`` that sleeps
0.2 s per request; the scorer sends it an HTTP POST through ``RemoteReward``). For 1, 2, 3 and 4
sources (the 4th another plain function) the script scores a batch of 64 completions with
``RewardScorer(concurrent=False)`` (what the trainer did before: one source after another) and
``RewardScorer(concurrent=True)`` (the default now), alternating the two in every round, and
prints the median and range over the rounds, and the 1-minute load average at the start and end.

    python benchmarks/reward_concurrency.py            # 7 rounds (~30 s)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from reinforcepp.rewards import RemoteReward, RewardScorer, RewardSource

DELAY = 0.2


def slow_plain(completions, **kwargs):
    time.sleep(DELAY)
    return [float(len(c)) for c in completions]


def slow_plain_2(completions, **kwargs):
    time.sleep(DELAY)
    return [1.0 for _ in completions]


async def slow_async(completions, **kwargs):
    await asyncio.sleep(DELAY)
    return [0.5 for _ in completions]


class SlowHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(DELAY)
        out = json.dumps({"rewards": [0.25] * len(body["completions"])}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/score"
    all_sources = [
        RewardSource("plain", slow_plain),
        RewardSource("async", slow_async),
        RewardSource("url", RemoteReward(url)),
        RewardSource("plain_2", slow_plain_2),
    ]
    prompts = [f"p{i}" for i in range(args.batch)]
    completions = [f"completion {i}" for i in range(args.batch)]
    load_start = os.getloadavg()[0]
    print(f"{args.batch} completions per call, {DELAY} s per source call, {args.rounds} rounds (alternating), "
          f"load average {load_start:.1f}")
    print("| sources | one after another: median (min-max) s | concurrent: median (min-max) s | speed-up (median) |")
    print("|---|---|---|---|")
    for n in (1, 2, 3, 4):
        sources = all_sources[:n]
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(args.rounds):
            for concurrent in ((False, True) if r % 2 == 0 else (True, False)):
                scorer = RewardScorer(sources, timeout=30, concurrent=concurrent)
                t0 = time.perf_counter()
                result = scorer(prompts, completions, {})
                times[concurrent].append(time.perf_counter() - t0)
                assert result.rewards.shape == (args.batch,)
        seq, con = times[False], times[True]
        speed_up = statistics.median(seq) / statistics.median(con)
        print(f"| {n} ({', '.join(s.name for s in sources)}) "
              f"| {statistics.median(seq):.3f} ({min(seq):.3f}-{max(seq):.3f}) "
              f"| {statistics.median(con):.3f} ({min(con):.3f}-{max(con):.3f}) | {speed_up:.2f}x |")
    print(f"load average at the end {os.getloadavg()[0]:.1f} (2 CPU cores shared with other jobs)")
    server.shutdown()


if __name__ == "__main__":
    main()
