"""Static readers for docker/: Dockerfile instructions, Compose interpolation, Kubernetes schema pruning.

No Docker engine or Kubernetes API is reachable on the project's machines, so tests/test_docker.py checks
the deployment files by reading them; these helpers do the reading.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Instruction", "read_dockerfile", "arg_defaults", "shell_commands", "apt_installs", "read_env_file", "interpolate",
    "variables_in", "pruned_fields", "image_parts",
]


@dataclass(frozen=True)
class Instruction:
    line: int  # 1-based line of the instruction's first line
    name: str  # upper-case instruction, e.g. RUN
    args: str  # arguments with continuation lines joined, comment lines dropped


def read_dockerfile(path: Path) -> list[Instruction]:
    """The Dockerfile's instructions in order, the way the builder joins `\\` continuations."""
    out: list[Instruction] = []
    start, parts = 0, []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not parts and (not stripped or stripped.startswith("#")):
            continue
        if parts and stripped.startswith("#"):  # a comment line inside a continuation is dropped
            continue
        if not parts:
            start = number
        continued = stripped.endswith("\\")
        parts.append(stripped[:-1] if continued else stripped)
        if not continued:
            text = " ".join(p for p in parts if p)
            name, _, args = text.partition(" ")
            out.append(Instruction(line=start, name=name.upper(), args=args.strip()))
            parts = []
    if parts:
        raise ValueError(f"{path}: the last instruction ends in a line continuation")
    return out


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    """{name: default} of every `ARG NAME=default`."""
    defaults = {}
    for ins in instructions:
        if ins.name == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def shell_commands(run_args: str) -> list[list[str]]:
    """The simple commands of one RUN instruction's shell text, each as its words (quote-aware)."""
    lexer = shlex.shlex(run_args, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words = [], []
    for token in lexer:
        if token in {"&&", "||", ";", "|", ">", "then", "fi", "else", "do", "done"}:
            commands.append(words)
            words = []
        else:
            words.append(token)
    return [c for c in commands + [words] if c]


def apt_installs(run_args: str) -> list[str]:
    """Package names given to every `apt-get install` in one RUN instruction's shell text."""
    return [w for c in shell_commands(run_args) if c[:2] == ["apt-get", "install"]
            for w in c[2:] if not w.startswith("-")]


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a dotenv file (comments and blank lines skipped)."""
    env = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise ValueError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        key, _, value = line.partition("=")
        env[key.strip()] = value.strip()
    return env


# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, and $$ (a literal $).
_REF = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution applied to every string in `value` (dicts and lists walked)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if unset and op and op.endswith("-"):
            return arg
        if unset and op and op.endswith("?"):
            raise KeyError(f"required variable {name} is missing: {arg}")
        return current or ""

    return _REF.sub(substitute, value)


def variables_in(value: Any) -> set[str]:
    """Names of every ${VAR...} reference in `value`."""
    if isinstance(value, dict):
        return set().union(*(variables_in(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(variables_in(v) for v in value)) if value else set()
    if not isinstance(value, str):
        return set()
    return {m.group("name") for m in _REF.finditer(value) if m.group("name")}


def pruned_fields(doc: Any, schema: dict, path: str = "") -> list[str]:
    """Dotted paths in `doc` that a Kubernetes structural schema does not declare (the API server drops them)."""
    if isinstance(doc, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return []
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        found = []
        for key, value in doc.items():
            if props is not None and key in props:
                found += pruned_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += pruned_fields(value, extra, f"{path}.{key}")
            elif props is not None or extra is False:
                found.append(f"{path}.{key}".lstrip("."))
        return found
    if isinstance(doc, list) and "items" in schema:
        return [p for i, item in enumerate(doc) for p in pruned_fields(item, schema["items"], f"{path}[{i}]")]
    return []


def image_parts(image: str) -> tuple[str, str, str]:
    """(registry/path prefix, repository name, tag) of an image reference; tag '' when absent."""
    if "@" in image:
        raise ValueError(f"digest references are not used in docker/: {image}")
    repo, tag = (image.rsplit(":", 1) if ":" in image.rsplit("/", 1)[-1] else (image, ""))
    prefix, _, name = repo.rpartition("/")
    return prefix, name, tag
