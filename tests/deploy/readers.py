"""Readers for the deployment files (no Docker engine runs here): the compose file with compose's
own variable interpolation, a small nginx config parser, PromQL metric-name extraction."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

#: values for the secrets compose requires from the environment / .env
TEST_ENV = {"REDIS_PASSWORD": "test-redis-password", "GRAFANA_ADMIN_PASSWORD": "test-grafana-password"}


# -- compose --------------------------------------------------------------------------------------
def compose_cli(docker: str = "docker") -> list[str] | None:
    """The compose command that answers here (``docker compose`` v2, else ``docker-compose`` v1)."""
    for cmd in ([docker, "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            if subprocess.run([*cmd, "version"], capture_output=True, timeout=30).returncode == 0:
                return cmd
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


def load_compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}"
                  r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def interpolation_vars(value: str) -> list[tuple[str, str | None]]:
    """The ``(variable, operator)`` pairs compose would interpolate in ``value``."""
    return [(m["braced"] or m["bare"], m["op"]) for m in _VAR.finditer(value) if m.group() != "$$"]


def interpolate(value, env: dict[str, str]):
    """Compose's interpolation of one value: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``,
    ``${VAR-default}``, ``${VAR:?error}``, ``${VAR?error}`` (``:+``/``+`` too)."""
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group() == "$$":
            return "$"
        name, op, arg = m["braced"] or m["bare"], m["op"], m["arg"] or ""
        val = env.get(name)
        empty = val is None or (val == "" and op is not None and op.startswith(":"))
        if op in (":?", "?") and empty:
            raise KeyError(f"{name} is required: {arg}")
        if op in (":-", "-"):
            return arg if empty else val
        if op in (":+", "+"):
            return "" if empty else arg
        return val or ""

    return _VAR.sub(sub, value)


def env_of(svc: dict, env: dict[str, str] | None = None) -> dict[str, str]:
    """A service's environment after interpolation (mapping or list form)."""
    raw = svc.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {k: str(interpolate(v, env if env is not None else TEST_ENV)) for k, v in raw.items()}


def service_replicas(compose: dict) -> dict[str, int]:
    """Compose services that run the image's ``mtrank serve`` (built from the Dockerfile's ``service``
    target, its command not overridden: the events consumer shares the image) -> their replica count."""
    out = {}
    for name, svc in compose["services"].items():
        build = svc.get("build") or {}
        if isinstance(build, dict) and build.get("target") == "service" and "command" not in svc:
            out[name] = int((svc.get("deploy") or {}).get("replicas", 1))
    return out


def duration_s(text) -> float:
    """Compose duration (``15s``, ``1m30s``, ``500ms``) in seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(text))
    assert parts and "".join(a + b for a, b in parts) == str(text), f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def healthcheck_cmd(svc: dict) -> str:
    test = svc["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(test[1:])


# -- nginx ----------------------------------------------------------------------------------------
class Block(list):
    """Statements of one nginx block: ``(name, args, Block | None)``."""

    def all(self, name: str) -> list[tuple[str, list[str], Block | None]]:
        return [s for s in self if s[0] == name]

    def one(self, name: str):
        found = self.all(name)
        assert len(found) == 1, f"expected one {name!r}, found {len(found)}"
        return found[0]

    def walk(self):
        for stmt in self:
            yield stmt
            if stmt[2] is not None:
                yield from stmt[2].walk()


def _nginx_tokens(text: str):
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c in "{};":
            yield c
            i += 1
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            assert j < n, "unterminated quoted string in nginx.conf"
            yield ("str", text[i + 1:j])
            i = j + 1
        else:
            j = i
            while j < n and not text[j].isspace() and text[j] not in "{};\"'":
                j += 1
            yield ("str", text[i:j])
            i = j


def parse_nginx(text: str) -> Block:
    """Parse nginx.conf into nested blocks; unbalanced braces or an unterminated statement fail."""
    tokens = list(_nginx_tokens(text))
    pos = 0

    def block(top: bool) -> Block:
        nonlocal pos
        out, words = Block(), []
        while pos < len(tokens):
            t = tokens[pos]
            pos += 1
            if t == ";":
                assert words, "empty statement in nginx.conf"
                out.append((words[0], words[1:], None))
                words = []
            elif t == "{":
                assert words, "block without a name in nginx.conf"
                out.append((words[0], words[1:], block(False)))
                words = []
            elif t == "}":
                assert not top, "unbalanced '}' in nginx.conf"
                assert not words, f"statement {words} not terminated with ';'"
                return out
            else:
                words.append(t[1])
        assert top, "unclosed '{' in nginx.conf"
        assert not words, f"statement {words} not terminated with ';'"
        return out

    return block(True)


def nginx_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", text)
    assert m, f"bad nginx size {text!r}"
    return int(m[1]) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m[2].lower()]


# -- PromQL ---------------------------------------------------------------------------------------
_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                    "unless", "offset", "inf", "nan", "atan2"}


def promql_metric_names(expr: str) -> set[str]:
    """Series names an expression selects (functions, aggregations, labels, ranges, numbers and
    Grafana's ``$__...`` variables are left out)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    s = re.sub(r"(?<![A-Za-z0-9_:])\d+(?:\.\d*)?(?:[eE][-+]?\d+)?", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end():].lstrip().startswith("(") or m.group().lower() in _PROMQL_KEYWORDS:
            continue
        names.add(m.group())
    return names
