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
from baton.bench.accept import accept, usual
from baton.bench.fanout import fanout
from baton.bench.peers import broker, database
from baton.bench.pipeline import pipeline_run, purge
from baton.bench.profile import Profiler
from baton.offline_model import ModelSettings

SCENARIOS = ("accept", "pipeline", "cost", "fanout", "peers")
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
    fast = ModelSettings(words_per_reply=args.words)
    with stack.running(fast, Path(args.logs) if args.logs else None) as st:
        say(f"stack up in {st.base}")
        if "accept" in chosen:
            st.start_services(["gateway"], _env(args))
            say(
                f"accept: {args.concurrency} connections, {args.duration:.0f}s each (gateway alone)"
            )
            prof = _profiler(args, "accept", st.pids())
            result["accept"] = accept(st, args.concurrency, args.duration)
            if prof is not None:
                result["accept"]["profile"] = prof.stop()
            st.stop_services()
            asyncio.run(purge(st))
        if peers:
            say("peers: the usual design, the broker's and the database's ceilings")
            result["peers"] = {
                "usual": usual(st, args.concurrency, args.duration),
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


def ratios(r: Result) -> Result:
    out: Result = {}
    acc = r.get("accept", {}).get("unkeyed", {}).get("requests_per_s")
    keyed = r.get("accept", {}).get("keyed", {}).get("requests_per_s")
    peers = r.get("peers", {})
    usual = peers.get("usual", {}).get("requests_per_s")
    broker = peers.get("broker", {})
    db = peers.get("database", {})
    fast = r.get("pipeline", {}).get("fast", {}).get("sustained_per_s")

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a and b else None

    out["accept_vs_usual"] = ratio(acc, usual)
    out["keyed_accept_vs_usual"] = ratio(keyed, usual)
    out["accept_vs_broker_sync"] = ratio(acc, broker.get("sync_per_s"))
    out["accept_vs_broker_concurrent"] = ratio(acc, broker.get("concurrent_per_s"))
    out["accept_vs_broker_async"] = ratio(acc, broker.get("async_per_s"))
    out["pipeline_vs_database_copy"] = ratio(fast, db.get("copy_1000_per_s"))
    return {k: v for k, v in out.items() if v is not None}


def _table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


def tables(r: Result) -> str:
    parts = []
    mach = r["machine"]
    parts.append(
        f"machine: {mach['nproc']} cores, {mach['cpu_model']}, {mach['memory_gb']} GB, "
        f"load {mach['loadavg']}"
    )
    lat = ["p50_ms", "p95_ms", "p99_ms", "max_ms"]
    rows: list[list[Any]] = []
    if "accept" in r:
        for name in ("unkeyed", "keyed"):
            a = r["accept"][name]
            rows.append(
                [f"baton {name}", a["requests_per_s"], *(a["latency"][k] for k in lat), a["errors"]]
            )
    usual = r.get("peers", {}).get("usual")
    if usual:
        rows.append(
            [
                "usual design",
                usual["requests_per_s"],
                *(usual["latency"][k] for k in lat),
                usual["errors"],
            ]
        )
    if rows:
        parts.append(_table("accept: POST /api/chat", ["what", "req/s", *lat, "errors"], rows))
        cpu = [("baton unkeyed", r.get("accept", {}).get("unkeyed", {}))]
        cpu += [
            ("baton keyed", r.get("accept", {}).get("keyed", {})),
            ("usual design", usual or {}),
        ]
        crow = [
            [
                what,
                ", ".join(f"{n} {v}" for n, v in a.get("cpu_us_per_request", {}).items())
                + f", load generator {a.get('loadgen_cpu_us_per_request', '?')}",
            ]
            for what, a in cpu
            if a
        ]
        parts.append(_table("accept: CPU µs per request", ["what", "by process"], crow))
    peers = r.get("peers", {})
    if "broker" in peers or "database" in peers:
        prow = [[f"broker {k}", v] for k, v in peers.get("broker", {}).items()]
        prow += [[f"database {k}", v] for k, v in peers.get("database", {}).items()]
        parts.append(_table("ceilings", ["what", "value"], prow))
    for name, p in r.get("pipeline", {}).items():
        rows = [
            [
                "offered / accepted / sustained msg/s",
                f"{p['offered_per_s']} / {p['accepted_per_s']} / {p['sustained_per_s']}",
            ],
            ["submitted / completed", f"{p['submitted']} / {p['completed']} ({p['outcomes']})"],
            ["end to end p50/p95/p99 ms", _lat(p["end_to_end"])],
            ["model time per message ms", p["model_ms_per_message"]],
            ["overhead p50/p95/p99 ms", _lat(p["overhead"])],
            ["SSE first token p50/p95/p99 ms", _lat(p["ttft"])],
            ["first-token overhead p50/p95/p99 ms", _lat(p["ttft_overhead"])],
            ["drain after last submit s", p["drain_s"]],
            ["NATS msgs in / out per message", _per(p.get("nats_per_message", {}))],
        ]
        parts.append(_table(f"pipeline ({name}, pace {p['pace']})", ["what", "value"], rows))
    cost = r.get("cost")
    if cost:
        rows = [
            [n, c["cpu_s_per_1000"], c["rss_idle_mb"], c["rss_load_mb"]]
            for n, c in cost["services"].items()
        ]
        parts.append(
            _table(
                f"cost ({cost['messages']} messages)",
                ["process", "cpu s / 1000 msgs", "rss idle MB", "rss load MB"],
                rows,
            )
        )
    if r.get("fanout"):
        rows = [
            [
                f["clients"],
                f["events_per_s"],
                f"{f['delivered']}/{f['sent']}",
                *(f["latency"][k] for k in lat),
            ]
            for f in r["fanout"]
        ]
        parts.append(
            _table("fan-out: SSE token delivery", ["clients", "events/s", "delivered", *lat], rows)
        )
    for label, tops in _profiles(r):
        for name, top in tops.items():
            rows = [[share, fn] for fn, share in top[:10]]
            parts.append(
                _table(f"profile {label} {name} (self time, % of samples)", ["%", "function"], rows)
            )
    if r.get("ratios"):
        parts.append(_table("ratios", ["what", "x"], [[k, v] for k, v in r["ratios"].items()]))
    return "\n\n".join(parts)


def _profiles(r: Result) -> list[tuple[str, dict[str, Any]]]:
    out = []
    if "profile" in r.get("accept", {}):
        out.append(("accept", r["accept"]["profile"]))
    if "profile" in r.get("pipeline", {}).get("fast", {}):
        out.append(("pipeline", r["pipeline"]["fast"]["profile"]))
    return out


def _per(n: dict[str, float]) -> str:
    return f"{n.get('in_msgs', '?')} / {n.get('out_msgs', '?')}"


def _lat(s: dict[str, float]) -> str:
    return f"{s['p50_ms']} / {s['p95_ms']} / {s['p99_ms']}"


def main(args: argparse.Namespace) -> int:
    result = run(args)
    if args.json:
        sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    else:
        print(tables(result))
    return 0
