"""What ``baton bench`` prints: the ratios between baton and its peers, and the tables."""

from __future__ import annotations

from typing import Any

Result = dict[str, Any]


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
    if r.get("paging"):
        pg = r["paging"]
        rows = [
            [
                c["case"],
                c["rows"],
                c["http"]["p50_ms"],
                c["http"]["p99_ms"],
                c["db"]["p50_ms"],
                c["db"]["p99_ms"],
                c["db"]["index"],
            ]
            for c in pg["cases"]
        ]
        parts.append(
            _table(
                f"paging ({pg['requests_per_case']} sequential GETs per page, seeded in "
                f"{pg['seed_s']} s)",
                ["page", "rows", "http p50 ms", "http p99 ms", "db p50 ms", "db p99 ms", "index"],
                rows,
            )
        )
    if r.get("replay"):
        rp = r["replay"]
        rows = [
            [c["case"], c["events"], c["p50_ms"], c["p99_ms"], c["max_ms"]] for c in rp["cases"]
        ]
        parts.append(
            _table(
                f"replay ({rp['requests_per_case']} sequential SSE resumes per shape)",
                ["conversation", "events", "p50 ms", "p99 ms", "max ms"],
                rows,
            )
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
