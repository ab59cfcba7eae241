"""The ``baton`` command: up, token, chat, run, provision, migrate, roles, nats-config, model, mcp, dlq, archive, bench."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from pathlib import Path

SERVICES = ("gateway", "persister", "agent", "policy", "executor")


def _cmd_up(args: argparse.Namespace) -> int:
    from baton.up import Stack
    from services.policy.policyfile import PolicyFileError, load

    policy = args.policy or os.environ.get("BATON_POLICY_FILE", "")
    if policy:
        # Refused here, once, rather than by a policy process the supervisor keeps restarting.
        try:
            load(policy)
        except PolicyFileError as exc:
            print(f"baton up: {exc}", file=sys.stderr)
            return 2
        # Every service's environment derives from ours: policy reads it, and reloads it.
        os.environ["BATON_POLICY_FILE"] = str(Path(policy).resolve())
    return Stack(Path(args.data_dir), args.port).run()


def _cmd_token(args: argparse.Namespace) -> int:
    from baton.devtoken import make_token, secret_for

    data_dir = Path(args.data_dir)
    if not (data_dir / "jwt_secret").exists() and not args.create:
        print(
            f"no secret in {data_dir}: run `baton up --data-dir {data_dir}` first", file=sys.stderr
        )
        return 2
    print(make_token(secret_for(data_dir), args.project, args.user, args.ttl))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"services.{args.service}.main")
    module.main()
    return 0


def _cmd_provision(args: argparse.Namespace) -> int:
    from baton.provision import provision

    for line in asyncio.run(
        provision(
            args.nats_url,
            dedup_window_s=args.dedup_window,
            replicas=args.replicas,
            user=os.environ.get("BATON_NATS_USER", ""),
            password=os.environ.get("BATON_NATS_PASSWORD", ""),
            ack_wait_s=args.ack_wait,
        )
    ):
        print(line)
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    from baton.migrate import migrate

    applied = asyncio.run(migrate(args.database_url))
    print("\n".join(f"applied {name}" for name in applied) or "schema up to date")
    return 0


def _cmd_roles(args: argparse.Namespace) -> int:
    from baton import deploy, roles

    passwords = {
        service: os.environ.get(deploy.db_password_var(service), "")
        for service in roles.SERVICES_WITH_DB
    }
    for line in asyncio.run(deploy.set_role_passwords(args.database_url, passwords)):
        print(line)
    return 0


def _cmd_nats_config(args: argparse.Namespace) -> int:
    import json

    from baton import deploy

    if args.helm_values:
        # JSON is YAML: `helm install -f` reads it as it is.
        text = json.dumps(deploy.helm_values(), indent=2) + "\n"
    else:
        text = deploy.nats_conf(store_dir=args.store_dir)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _cmd_dlq(args: argparse.Namespace) -> int:
    from baton.dlq import cli

    return cli(args)


def _cmd_chat(args: argparse.Namespace) -> int:
    from baton import chat

    return chat.main(args)


def _cmd_archive(args: argparse.Namespace) -> int:
    from baton import archive

    return archive.main(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from baton.bench import run

    return run.main(args)


def _cmd_model(args: argparse.Namespace) -> int:
    from baton import offline_model

    offline_model.serve(args)
    return 0


def version() -> str:
    """The version and commit: stamped into the image (BATON_VERSION, BATON_COMMIT) by
    `make image`, else the installed package's version."""
    stamped = os.environ.get("BATON_VERSION", "")
    if not stamped:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as installed

        try:
            stamped = installed("baton")
        except PackageNotFoundError:
            stamped = "unknown"
    commit = os.environ.get("BATON_COMMIT", "")
    return f"baton {stamped} ({commit})" if commit else f"baton {stamped}"


def _cmd_mcp(args: argparse.Namespace) -> int:
    from baton import mcp_server

    if args.stdio:
        mcp_server.serve_stdio(args.ledger)
    else:
        mcp_server.serve(args.host, args.port, args.ledger, args.port_file)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="baton", description="baton: a chat backend that never loses a message"
    )
    p.add_argument("--version", action="version", version=version())
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run everything on this machine")
    up.add_argument("--port", type=int, default=8000, help="gateway HTTP port (0 = any free port)")
    up.add_argument("--data-dir", default=".baton", help="where NATS, Postgres and secrets live")
    up.add_argument(
        "--policy",
        default="",
        help="policy file (TOML, docs/policy.md); default: $BATON_POLICY_FILE, else built-in rules",
    )
    up.set_defaults(func=_cmd_up)

    tok = sub.add_parser("token", help="print a dev JWT for a data dir")
    tok.add_argument("--data-dir", default=".baton")
    tok.add_argument("--project", required=True)
    tok.add_argument("--user", required=True)
    tok.add_argument("--ttl", type=int, default=30 * 24 * 3600, help="seconds until it expires")
    tok.add_argument("--create", action="store_true", help="create the secret if missing")
    tok.set_defaults(func=_cmd_token)

    run = sub.add_parser("run", help="run one service in the foreground")
    run.add_argument("service", choices=SERVICES)
    run.set_defaults(func=_cmd_run)

    prov = sub.add_parser("provision", help="create streams, consumers and buckets")
    prov.add_argument(
        "--nats-url", default=os.environ.get("BATON_NATS_URL", "nats://127.0.0.1:4222")
    )
    prov.add_argument("--dedup-window", type=float, default=120.0, help="seconds")
    prov.add_argument(
        "--replicas",
        type=int,
        default=int(os.environ.get("BATON_PROVISION_REPLICAS", "1")),
        help="copies of every stream and bucket: 1 on one server, 3 on a 3-node cluster "
        "(BATON_PROVISION_REPLICAS)",
    )
    prov.add_argument(
        "--ack-wait",
        type=float,
        default=None,
        help="seconds before an unacked message is redelivered",
    )
    prov.set_defaults(func=_cmd_provision)

    mig = sub.add_parser("migrate", help="apply database migrations")
    mig.add_argument("--database-url", default=os.environ.get("BATON_DATABASE_URL", ""))
    mig.set_defaults(func=_cmd_migrate)

    rol = sub.add_parser(
        "roles",
        help="create the per-service database roles; set passwords from DB_PASSWORD_<SERVICE>",
    )
    rol.add_argument("--database-url", default=os.environ.get("BATON_DATABASE_URL", ""))
    rol.set_defaults(func=_cmd_roles)

    ncf = sub.add_parser(
        "nats-config",
        help="print nats-server's config (or the Helm chart's values) with one user per service",
    )
    ncf.add_argument("--helm-values", action="store_true", help="values for the NATS Helm chart")
    ncf.add_argument("--store-dir", default="/data/jetstream", help="JetStream's file store")
    ncf.add_argument("--out", help="write here instead of stdout")
    ncf.set_defaults(func=_cmd_nats_config)

    # --nats-url on each action, so it may follow the action: `baton dlq list --nats-url …`.
    dlq_common = argparse.ArgumentParser(add_help=False)
    dlq_common.add_argument(
        "--nats-url", default=os.environ.get("BATON_NATS_URL", "nats://127.0.0.1:4222")
    )
    dlq = sub.add_parser("dlq", help="list, show and replay dead letters")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq_sub.add_parser("list", parents=[dlq_common], help="list dead letters")
    dlq_list.add_argument("--consumer", help="only this consumer's dead letters")
    dlq_list.add_argument("--limit", type=int, default=100, help="at most this many, oldest first")
    dlq_list.add_argument("--json", action="store_true", help="one JSON object per line")
    dlq_show = dlq_sub.add_parser("show", parents=[dlq_common], help="one dead letter in full")
    dlq_show.add_argument("id", type=int, help="the id `baton dlq list` shows")
    dlq_show.add_argument("--json", action="store_true")
    dlq_replay = dlq_sub.add_parser(
        "replay", parents=[dlq_common], help="republish to the original subject, then delete"
    )
    dlq_replay.add_argument("id", type=int, help="the id `baton dlq list` shows")
    dlq.set_defaults(func=_cmd_dlq)

    from baton import apikeys

    apikeys.add_parser(sub)

    chat = sub.add_parser("chat", help="send a message and print the answer as it streams")
    chat.add_argument("message", nargs="*", help="the message; without it, one per stdin line")
    chat.add_argument("--conversation", help="continue this conversation (its id)")
    chat.add_argument("--url", help="gateway URL (default: BATON_URL or the data dir's)")
    chat.add_argument("--token", help="bearer token (default: BATON_TOKEN or the data dir's)")
    chat.add_argument(
        "--yes",
        action="store_true",
        help="approve every tool call the model asks for (default: ask y/n for each)",
    )
    chat.add_argument("--data-dir", default=".baton", help="where `baton up` wrote endpoints.json")
    chat.set_defaults(func=_cmd_chat)

    arc = sub.add_parser(
        "archive", help="retention: run the archive sweep once, or restore a conversation"
    )
    from baton.archive import add_arguments as archive_arguments

    archive_arguments(arc)
    arc.set_defaults(func=_cmd_archive)

    bench = sub.add_parser(
        "bench",
        help="measure accept, pipeline, cost and fan-out against peers, on a stack of its own",
    )
    from baton.bench.run import add_arguments

    add_arguments(bench)
    bench.set_defaults(func=_cmd_bench)

    model = sub.add_parser("model", help="run the offline Anthropic-compatible model server")
    # The server's own options, declared here (a REMAINDER positional in a subparser would refuse
    # `baton model --host …`, the command line of compose and the dev cluster).
    from baton.offline_model import add_arguments as add_model_arguments

    add_model_arguments(model)
    model.set_defaults(func=_cmd_model)

    mcp = sub.add_parser("mcp", help="run baton's demo MCP server (streamable HTTP)")
    mcp.add_argument("--host", default="127.0.0.1")
    mcp.add_argument("--port", type=int, default=0, help="0: a free port")
    mcp.add_argument("--ledger", type=Path, required=True, help="append-only executions file")
    mcp.add_argument("--port-file", type=Path, default=None)
    mcp.add_argument("--stdio", action="store_true", help="speak MCP over stdin/stdout instead")
    mcp.set_defaults(func=_cmd_mcp)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    sys.exit(args.func(args))
