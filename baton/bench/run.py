"""``baton bench``: start a stack of its own, run the chosen scenarios, print tables or JSON."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from baton.bench import procstat, stack
from baton.bench.accept import GENERATORS, accept, generator, usual
from baton.bench.fanout import fanout
from baton.bench.paging import paging
from baton.bench.peers import broker, database
from baton.bench.pipeline import pipeline_run, purge
from baton.bench.profile import Profiler
from baton.bench.replay import replay
from baton.bench.report import ratios, tables
from baton.offline_model import ModelSettings

SCENARIOS = ("accept", "pipeline", "cost", "fanout", "peers", "paging", "replay")
Result = dict[str, Any]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "scenarios",
        nargs="*",
        choices=[*SCENARIOS, "all"],
        default=["all"],
        help="which to run (default: all); peers run with accept and pipeline unless --no-peers",
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per measurement")
    p.add_argument("--concurrency", type=int, default=64, help="accept: connections in flight")
    p.add_argument(
        "--loadgen",
        choices=GENERATORS,
        default="auto",
        help="accept and the usual design: wrk when installed (auto), or the Python generator",
    )
    p.add_argument("--rate", type=float, default=300.0, help="pipeline: messages/s offered")
    p.add_argument(
        "--light-rate",
        type=float,
        default=20.0,
        help="pipeline at zero pace, well under capacity: the overhead without queueing (0 = skip)",
    )
    p.add_argument(
        "--realistic-rate", type=float, default=30.0, help="pipeline at a realistic pace: msgs/s"
    )
    p.add_argument("--ttft-ms", type=float, default=300.0, help="realistic pace: first token")
    p.add_argument("--tokens-per-second", type=float, default=80.0, help="realistic pace")
    p.add_argument("--words", type=int, default=20, help="tokens per answer")
    p.add_argument("--ttft-samples", type=int, default=20, help="SSE first-token probes per run")
    p.add_argument(
        "--fanout-clients", default="10,100,1000", help="comma-separated SSE client counts"
    )
    p.add_argument("--fanout-hz", type=float, default=5.0, help="tokens per client per second")
    p.add_argument(
        "--paging-requests", type=int, default=300, help="paging: requests per page shape"
    )
    p.add_argument("--replay-requests", type=int, default=300, help="replay: SSE resumes per shape")
    p.add_argument(
        "--paging-messages",
        type=int,
        default=100_000,
        help="paging: messages in the long conversation (and conversations of the busy user / 10)",
    )
    p.add_argument("--no-peers", action="store_true", help="skip the peers (faster)")
    p.add_argument("--no-realistic", action="store_true", help="skip the realistic-pace run")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the services (repeatable), e.g. AGENT_CONCURRENCY=64",
    )
    p.add_argument("--logs", metavar="DIR", help="copy every process's log into DIR at the end")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="record py-spy profiles of the gateway (accept) and every service (pipeline) into DIR",
    )


def run(args: argparse.Namespace) -> Result:
    chosen = set(SCENARIOS if "all" in args.scenarios else args.scenarios)
    peers = not args.no_peers and ("peers" in chosen or bool(chosen & {"accept", "pipeline"}))

    def say(line: str) -> None:
        if not args.json:
            print(f"[bench] {line}", flush=True)

    result: Result = {
        "machine": procstat.machine(),
        "started_at": time.strftime("%FT%TZ", time.gmtime()),
    }
    fast = ModelSettings(words_per_reply=args.words, style="hostile")
    gen = generator(args.loadgen)
    with stack.running(fast, Path(args.logs) if args.logs else None) as st:
        say(f"stack up in {st.base}")
        if "accept" in chosen:
            st.start_services(["gateway"], _env(args))
            say(
                f"accept: {args.concurrency} connections, {args.duration:.0f}s each (gateway alone)"
            )
            prof = _profiler(args, "accept", st.pids())
            result["accept"] = accept(st, args.concurrency, args.duration, gen)
            if prof is not None:
                result["accept"]["profile"] = prof.stop()
            st.stop_services()
            asyncio.run(purge(st))
        if "paging" in chosen:
            st.start_services(["gateway"], _env(args))
            n = args.paging_messages
            say(f"paging: {n:,} messages, {n // 10:,} conversations vs 10 (gateway alone)")
            result["paging"] = paging(
                st, big_messages=n, big_conversations=n // 10, requests=args.paging_requests
            )
            st.stop_services()
        if "replay" in chosen:
            st.start_services(["gateway"], _env(args))
            say(f"replay: {args.replay_requests} SSE resumes of each shape (gateway alone)")
            result["replay"] = replay(st, requests=args.replay_requests)
            st.stop_services()
        if peers:
            say("peers: the usual design, the broker's and the database's ceilings")
            result["peers"] = {
                "usual": usual(st, args.concurrency, args.duration, gen),
                "broker": asyncio.run(
                    broker(st.nats.url, st.admin_password, min(args.duration, 5.0))
                ),
                "database": asyncio.run(database(st.dsn, min(args.duration, 5.0))),
            }
        if chosen & {"pipeline", "cost", "fanout"}:
            st.start_services(extra=_env(args))
            time.sleep(1.0)
            if chosen & {"pipeline", "cost"}:
                say(f"pipeline: {args.rate:.0f} msg/s offered for {args.duration:.0f}s, zero pace")
                prof = _profiler(args, "pipeline", st.pids())
                fast_run = asyncio.run(
                    pipeline_run(st, fast, args.rate, args.duration, args.ttft_samples)
                )
                if prof is not None:
                    fast_run["profile"] = prof.stop()
                result["pipeline"] = {"fast": fast_run}
                result["cost"] = {
                    "messages": fast_run["completed"],
                    "services": fast_run["cost"],
                }
                if args.light_rate > 0 and "pipeline" in chosen:
                    say(
                        f"pipeline: {args.light_rate:.0f} msg/s, zero pace (overhead without a queue)"
                    )
                    result["pipeline"]["light"] = asyncio.run(
                        pipeline_run(st, fast, args.light_rate, args.duration, args.ttft_samples)
                    )
                if not args.no_realistic and "pipeline" in chosen:
                    real = ModelSettings(
                        ttft_ms=args.ttft_ms,
                        tokens_per_second=args.tokens_per_second,
                        words_per_reply=args.words,
                        style="hostile",
                    )
                    say(
                        f"pipeline: {args.realistic_rate:.0f} msg/s, pace {args.ttft_ms:.0f} ms + "
                        f"{args.tokens_per_second:.0f} tokens/s"
                    )
                    result["pipeline"]["realistic"] = asyncio.run(
                        pipeline_run(
                            st, real, args.realistic_rate, args.duration, args.ttft_samples
                        )
                    )
            if "fanout" in chosen:
                counts = [int(x) for x in str(args.fanout_clients).split(",") if x.strip()]
                result["fanout"] = []
                for n in counts:
                    say(f"fan-out: {n} SSE clients, {args.fanout_hz:.0f} tokens/s each")
                    result["fanout"].append(
                        asyncio.run(fanout(st, n, args.fanout_hz, min(args.duration, 10.0)))
                    )
    result["ratios"] = ratios(result)
    result["finished_at"] = time.strftime("%FT%TZ", time.gmtime())
    return result


def _env(args: argparse.Namespace) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in args.service_env]
    bad = [item for item, pair in zip(args.service_env, pairs, strict=True) if len(pair) != 2]
    if bad:
        raise SystemExit(f"--service-env wants KEY=VALUE, got {bad[0]!r}")
    return {k: v for k, v in pairs}


def _profiler(args: argparse.Namespace, label: str, pids: dict[str, int]) -> Profiler | None:
    if not args.profile:
        return None
    services = {n: p for n, p in pids.items() if n in stack.SERVICES or n == "offline-model"}
    prof = Profiler(Path(args.profile), label, services)
    prof.start()
    return prof


def main(args: argparse.Namespace) -> int:
    result = run(args)
    if args.json:
        sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    else:
        print(tables(result))
    return 0
