"""The policy file (TOML, ``BATON_POLICY_FILE``): per-project rules, strictly validated.

Layout: ``[tiers.<name>]`` (a model and its prices per million tokens), ``[defaults]`` (rules of
any project not named) and ``[projects.<id>]`` (overrides, merged onto the defaults; nested
tables ``caps``, ``rate`` and ``downgrade`` merge key by key). ``docs/policy.md`` has the full
example. Parsing is pure (bytes in, rules or a :class:`PolicyFileError` out); reading the file
and reloading it on change live in :class:`Watcher`.
"""

from __future__ import annotations

import asyncio
import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from services.policy.core import Rules, ToolGrant, ToolRules
from shared import messages as m
from shared.errors import ConfigError
from shared.subjects import TOKEN_RE

MAX_FILE_BYTES = 1_000_000  # far above any real policy; a bigger file is refused unread
MAX_PROJECTS = 10_000

Name = Annotated[str, msgspec.Meta(pattern=TOKEN_RE.pattern)]
ModelName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:-]{1,64}$")]
Price = Annotated[float, msgspec.Meta(ge=0, le=100_000)]  # USD per million tokens
Tokens = Annotated[int, msgspec.Meta(ge=0, le=10**13)]
Usd = Annotated[float, msgspec.Meta(ge=0, le=10**9)]


class PolicyFileError(ConfigError):
    """The policy file cannot be used; the message names the file and the key or line."""


class Tier(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One model tier: its model and prices in USD per million tokens."""

    model: ModelName
    input: Price
    output: Price
    cache_read: Price = 0.0
    cache_write: Price = 0.0

    def prices(self) -> m.Prices:
        return m.Prices(
            input=self.input,
            output=self.output,
            cache_read=self.cache_read,
            cache_write=self.cache_write,
        )


class Caps(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Daily caps (UTC day), counted over input, output and cache tokens; absent: no cap."""

    project_daily_tokens: Tokens | None = None
    project_daily_cost_usd: Usd | None = None
    user_daily_tokens: Tokens | None = None
    user_daily_cost_usd: Usd | None = None


class Rate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Messages per user in fixed UTC windows; absent: no limit."""

    per_minute: Annotated[int, msgspec.Meta(ge=1, le=100_000)] | None = None
    per_hour: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None


class Downgrade(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Past ``at_fraction`` of any daily cap, answer with the model of tier ``to_tier``."""

    at_fraction: Annotated[float, msgspec.Meta(gt=0, le=1)]
    to_tier: Name


class ToolRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One tool of an MCP server as a project may use it (a tool not listed is never offered)."""

    approval: m.ToolApproval = "ask"  # auto: runs at once; ask: the user approves; deny: never
    idempotent: bool = False  # may a call a crash cut be run again (with its call id as key)?
    per_user_daily: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] | None = None  # UTC day
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    # What the model is shown; absent: the server's own description and schema (tools/list).
    description: Annotated[str, msgspec.Meta(max_length=4000)] | None = None
    input_schema: dict[str, Any] | None = None


class ToolServer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An MCP server: streamable HTTP at ``url``, or a ``command`` spoken to over stdio."""

    url: Annotated[str, msgspec.Meta(pattern=r"^https?://[^\s]{1,2000}$")] | None = None
    command: Annotated[list[str], msgspec.Meta(min_length=1, max_length=64)] | None = None
    env: dict[str, str] = msgspec.field(default_factory=dict)  # for a stdio command
    tools: Annotated[dict[m.ToolName, ToolRule], msgspec.Meta(max_length=256)] = msgspec.field(
        default_factory=dict
    )


class Tools(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A project's tools: its MCP servers and, per run, the most tool rounds."""

    max_rounds: Annotated[int, msgspec.Meta(ge=0, le=100)] = 5
    approval_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=7 * 86_400)] = 600.0
    servers: Annotated[dict[Name, ToolServer], msgspec.Meta(max_length=64)] = msgspec.field(
        default_factory=dict
    )


class GrantedTool(msgspec.Struct, frozen=True):
    """A tool as policy resolves it for a project: where it lives and its rules."""

    name: str
    server: str
    rule: ToolRule


class ToolPolicy(msgspec.Struct, frozen=True):
    """The resolved tool rules of one project (policy applies them as ``Rules.tools``)."""

    max_rounds: int = 5
    approval_timeout_s: float = 600.0
    servers: dict[str, ToolServer] = msgspec.field(default_factory=dict)
    tools: dict[str, GrantedTool] = msgspec.field(default_factory=dict)  # by tool name

    def offered(self) -> list[GrantedTool]:
        """The tools a run may offer the model: every listed one not set to ``deny``."""
        return [t for t in self.tools.values() if t.rule.approval != "deny"]

    def rules(self) -> ToolRules:
        """As policy's machine applies them (``Rules.tools``)."""
        return ToolRules(
            max_rounds=self.max_rounds,
            approval_timeout_s=self.approval_timeout_s,
            grants=tuple(
                ToolGrant(
                    name=t.name,
                    server=t.server,
                    approval=t.rule.approval,
                    idempotent=t.rule.idempotent,
                    per_user_daily=t.rule.per_user_daily,
                    timeout_s=t.rule.timeout_s,
                    description=t.rule.description or "",
                    input_schema=t.rule.input_schema,
                )
                for t in self.tools.values()
            ),
        )


class ProjectPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The rules of one project as written (after merging its overrides onto the defaults)."""

    default_model: ModelName = "claude-sonnet-4-6"
    allowed_models: Annotated[list[ModelName], msgspec.Meta(max_length=64)] | None = None
    allowed_executors: Annotated[list[m.Executor], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["chat", "code"]
    )
    default_executor: m.Executor = "chat"
    disallowed_intents: list[m.Intent] = msgspec.field(default_factory=list)
    clarify_ambiguous: bool = True
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3
    max_output_tokens: Annotated[int, msgspec.Meta(ge=1, le=200_000)] = 4096
    estimated_input_tokens: Annotated[int, msgspec.Meta(ge=0, le=2_000_000)] = 1000
    run_deadline_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 300.0
    double_texting: Literal["enqueue", "reject", "interrupt"] = "enqueue"
    retry_backoff_s: Annotated[
        list[Annotated[float, msgspec.Meta(ge=0, le=3600)]], msgspec.Meta(max_length=10)
    ] = msgspec.field(default_factory=lambda: [1.0, 4.0])
    fallback_model: ModelName | None = None
    max_concurrent_runs: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    caps: Caps = Caps()
    rate: Rate = Rate()
    downgrade: Downgrade | None = None
    tools: Tools = Tools()
    # Retention and the model's hot window (issue 16): the persister's sweep archives and
    # deletes conversations idle longer than retention_days (shared/retention.py reads it);
    # context_messages is the most history the executor sends, within its token budget.
    retention_days: Annotated[int, msgspec.Meta(ge=1, le=36_500)] | None = None
    context_messages: Annotated[int, msgspec.Meta(ge=1, le=100_000)] | None = None


class PolicyFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tiers: Annotated[dict[Name, Tier], msgspec.Meta(max_length=64)] | None = None
    defaults: dict[str, Any] = msgspec.field(default_factory=dict)
    projects: Annotated[dict[Name, dict[str, Any]], msgspec.Meta(max_length=MAX_PROJECTS)] = (
        msgspec.field(default_factory=dict)
    )


DEFAULT_TIERS: dict[str, Tier] = {
    "standard": Tier(
        model="claude-sonnet-4-6", input=3.0, output=15.0, cache_read=0.3, cache_write=3.75
    ),
    "economy": Tier(
        model="claude-haiku-4-5", input=1.0, output=5.0, cache_read=0.1, cache_write=1.25
    ),
}
_NESTED = ("caps", "rate", "downgrade")


class Book(msgspec.Struct, frozen=True):
    """The resolved rules: one per named project, and the defaults for every other project."""

    defaults: Rules
    projects: dict[str, Rules] = msgspec.field(default_factory=dict)
    default_tools: ToolPolicy = ToolPolicy()
    project_tools: dict[str, ToolPolicy] = msgspec.field(default_factory=dict)

    def rules_for(self, project: str) -> Rules:
        return self.projects.get(project, self.defaults)

    def tools_for(self, project: str) -> ToolPolicy:
        return self.project_tools.get(project, self.default_tools)


def parse(data: bytes, source: str = "policy file") -> Book:
    """Rules from the file's bytes, or :class:`PolicyFileError` naming the key or line."""
    if len(data) > MAX_FILE_BYTES:
        raise PolicyFileError(f"{source}: {len(data)} bytes, more than {MAX_FILE_BYTES}")
    try:
        text = data.decode("utf-8")
        raw = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise PolicyFileError(f"{source}: not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise PolicyFileError(f"{source}: invalid TOML: {exc}") from exc
    except RecursionError as exc:  # tomllib recurses per nesting level
        raise PolicyFileError(f"{source}: invalid TOML: nested too deeply") from exc
    try:
        top = msgspec.convert(raw, PolicyFile, strict=True)
    except msgspec.ValidationError as exc:
        raise PolicyFileError(f"{source}: {_where(text, '', exc)}") from exc
    tiers = DEFAULT_TIERS if top.tiers is None else top.tiers
    defaults, default_tools = _resolve(top.defaults, tiers, text, "defaults", source)
    projects: dict[str, Rules] = {}
    project_tools: dict[str, ToolPolicy] = {}
    for pid, over in top.projects.items():
        merged = _merge(top.defaults, over)
        projects[pid], project_tools[pid] = _resolve(merged, tiers, text, f"projects.{pid}", source)
    return Book(
        defaults=defaults,
        projects=projects,
        default_tools=default_tools,
        project_tools=project_tools,
    )


def load(path: str | Path) -> Book:
    """Read and parse the file at ``path`` (refused with a clear error when unusable)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise PolicyFileError(f"{p}: {size} bytes, more than {MAX_FILE_BYTES}")
        data = p.read_bytes()
    except OSError as exc:
        raise PolicyFileError(f"{p}: cannot read: {exc.strerror or exc}") from exc
    return parse(data, str(p))


def _merge(defaults: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = {**defaults, **over}
    for key in _NESTED:
        base, mine = defaults.get(key), over.get(key)
        if isinstance(base, dict) and isinstance(mine, dict):
            merged[key] = {**base, **mine}
    # Tools merge key by key, and servers by name: a project names a server to replace it whole.
    base, mine = defaults.get("tools"), over.get("tools")
    if isinstance(base, dict) and isinstance(mine, dict):
        servers = base.get("servers"), mine.get("servers")
        merged["tools"] = {**base, **mine}
        if isinstance(servers[0], dict) and isinstance(servers[1], dict):
            merged["tools"]["servers"] = {**servers[0], **servers[1]}
    return merged


def _resolve(
    raw: dict[str, Any], tiers: dict[str, Tier], text: str, table: str, source: str
) -> tuple[Rules, ToolPolicy]:
    try:
        p = msgspec.convert(raw, ProjectPolicy, strict=True)
    except msgspec.ValidationError as exc:
        named = _tool_error(raw.get("tools"), text, table)
        raise PolicyFileError(f"{source}: [{table}] {named or _where(text, table, exc)}") from exc
    problem = _check(p, tiers) or _check_tools(p.tools)
    if problem:
        raise PolicyFileError(f"{source}: [{table}] {problem}")
    tools = to_tool_policy(p.tools)
    return msgspec.structs.replace(to_rules(p, tiers), tools=tools.rules()), tools


def _tool_error(tools: Any, text: str, table: str) -> str:
    """The error of the first bad server or tool, by name (msgspec's paths omit dict keys)."""
    if not isinstance(tools, dict) or not isinstance(tools.get("servers"), dict):
        return ""
    for name, server in tools["servers"].items():
        if not isinstance(server, dict):
            continue
        rules = server.get("tools")
        for tool, rule in (rules if isinstance(rules, dict) else {}).items():
            try:
                msgspec.convert(rule, ToolRule, strict=True)
            except msgspec.ValidationError as exc:
                return _where(text, f"{table}.tools.servers.{name}.tools.{tool}", exc)
        try:
            msgspec.convert({**server, "tools": {}}, ToolServer, strict=True)
        except msgspec.ValidationError as exc:
            return _where(text, f"{table}.tools.servers.{name}", exc)
    return ""


def _check_tools(t: Tools) -> str:
    """A server is reached one way, and a tool name means one tool across a project's servers."""
    seen: dict[str, str] = {}
    for name, server in t.servers.items():
        where = f"tools.servers.{name}"
        if (server.url is None) == (server.command is None):
            return f"{where}: give exactly one of url (streamable HTTP) or command (stdio)"
        if server.env and server.command is None:
            return f"{where}.env: only a stdio command has an environment"
        for tool, rule in server.tools.items():
            if tool in seen:
                return (
                    f"{where}.tools.{tool}: tool {tool!r} is also offered by server {seen[tool]!r}"
                )
            seen[tool] = name
            schema = rule.input_schema
            if schema is not None and schema.get("type") != "object":
                return (
                    f'{where}.tools.{tool}.input_schema: must be a JSON Schema with type "object"'
                )
    return ""


def to_tool_policy(t: Tools) -> ToolPolicy:
    return ToolPolicy(
        max_rounds=t.max_rounds,
        approval_timeout_s=t.approval_timeout_s,
        servers=dict(t.servers),
        tools={
            tool: GrantedTool(name=tool, server=name, rule=rule)
            for name, server in t.servers.items()
            for tool, rule in server.tools.items()
        },
    )


def _check(p: ProjectPolicy, tiers: dict[str, Tier]) -> str:
    """Cross-references that types alone cannot check; an empty string when all is well."""
    priced = {t.model for t in tiers.values()}
    allowed = priced if p.allowed_models is None else set(p.allowed_models)
    unknown = sorted(allowed - priced)
    if unknown:
        return f"allowed_models: {unknown} not in any [tiers.*] (no prices)"
    if p.default_model not in allowed:
        return f"default_model: {p.default_model!r} is not an allowed, priced model"
    if p.fallback_model is not None and p.fallback_model not in allowed:
        return f"fallback_model: {p.fallback_model!r} is not an allowed, priced model"
    if p.default_executor not in p.allowed_executors:
        return f"default_executor: {p.default_executor!r} is not in allowed_executors"
    if p.downgrade is not None:
        tier = tiers.get(p.downgrade.to_tier)
        if tier is None:
            return f"downgrade.to_tier: no tier {p.downgrade.to_tier!r} in [tiers.*]"
        if tier.model not in allowed:
            return f"downgrade.to_tier: its model {tier.model!r} is not allowed"
    return ""


def to_rules(p: ProjectPolicy, tiers: dict[str, Tier]) -> Rules:
    prices = {t.model: t.prices() for t in tiers.values()}
    allowed = set(prices) if p.allowed_models is None else set(p.allowed_models)
    return Rules(
        default_model=p.default_model,
        models={name: prices[name] for name in sorted(allowed)},
        allowed_executors=frozenset(p.allowed_executors),
        default_executor=p.default_executor,
        max_attempts=p.max_attempts,
        max_output_tokens=p.max_output_tokens,
        run_deadline_s=p.run_deadline_s,
        double_texting=p.double_texting,
        retry_backoff_s=tuple(p.retry_backoff_s),
        fallback_model=p.fallback_model,
        limits=m.Limits(
            project_daily_tokens=p.caps.project_daily_tokens,
            project_daily_cost_usd=p.caps.project_daily_cost_usd,
            user_daily_tokens=p.caps.user_daily_tokens,
            user_daily_cost_usd=p.caps.user_daily_cost_usd,
            user_messages_per_minute=p.rate.per_minute,
            user_messages_per_hour=p.rate.per_hour,
            max_concurrent_runs=p.max_concurrent_runs,
        ),
        disallowed_intents=frozenset(p.disallowed_intents),
        clarify_ambiguous=p.clarify_ambiguous,
        estimated_input_tokens=p.estimated_input_tokens,
        downgrade_at=None if p.downgrade is None else p.downgrade.at_fraction,
        downgrade_model=None if p.downgrade is None else tiers[p.downgrade.to_tier].model,
        context_messages=p.context_messages or 0,
    )


_PATH_RE = re.compile(r"at `\$((?:\.[A-Za-z0-9_-]+|\[[^\]`]*\])*)`")


def _where(text: str, table: str, exc: msgspec.ValidationError) -> str:
    """The validation message with the dotted key and, when found, its line in the file."""
    message = str(exc)
    match = _PATH_RE.search(message)
    path = "" if match is None else re.sub(r"\[[^\]]*\]", "", match.group(1))
    keys = [k for k in path.split(".") if k]
    unknown = re.search(r"unknown field `([^`]+)`", message)
    if unknown is not None:
        keys.append(unknown.group(1))
    elif match is None:
        return message
    dotted = ".".join([table, *keys] if table else keys)
    line = _line_of(text, dotted)
    where = f"key {dotted!r}" + (f" (line {line})" if line else "")
    return f"{where}: {message[: match.start() if match else None].rstrip(' -')}"


def _line_of(text: str, dotted: str) -> int | None:
    """Best effort: the line where the last key of ``dotted`` is set under its table."""
    parts = dotted.split(".")
    if not parts:
        return None
    key = re.escape(parts[-1])
    tables = {".".join(parts[:i]) for i in range(len(parts))}
    current = ""
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        header = re.fullmatch(r"\[\s*([^\[\]]+?)\s*\]", stripped)
        if header:
            current = header.group(1).replace('"', "").replace(" ", "")
            continue
        if current in tables and re.match(rf'^"?{key}"?\s*=', stripped):
            return n
    return None


class Watcher:
    """Polls the file's mtime and size; a valid new version replaces the rules, a bad one is
    logged and counted while the previous rules stay in force."""

    def __init__(
        self,
        path: str | Path,
        book: Book,
        on_change: Callable[[Book], None],
        on_error: Callable[[PolicyFileError], None],
        interval_s: float = 2.0,
    ) -> None:
        self.path = Path(path)
        self.on_change = on_change
        self.on_error = on_error
        self.interval_s = interval_s
        self.seen = self._stamp()

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def check(self) -> bool:
        """Reload if the file changed since the last look; True when new rules took effect."""
        stamp = self._stamp()
        if stamp == self.seen:
            return False
        self.seen = stamp
        try:
            book = load(self.path)
        except PolicyFileError as exc:
            self.on_error(exc)
            return False
        self.on_change(book)
        return True

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.interval_s)
            except TimeoutError:
                self.check()
