"""Lint rules for images/Dockerfile.* (no Docker daemon here, so no image is built).

The rules are the hadolint checks our images must pass, written as small functions over
the parsed instructions: pinned base tags (DL3006/DL3007), a numeric non-root USER
(DL3002), COPY instead of ADD (DL3020), ``pip install --no-cache-dir`` (DL3042) with
pinned versions (DL3013), apt lists removed in the same layer (DL3008/DL3009/DL3015),
exec-form CMD/ENTRYPOINT (DL3025), no ``cd`` (DL3003) or ``sudo`` (DL3004), plus ours:
a HEALTHCHECK or a stated reason for ``HEALTHCHECK NONE``, the TORCH_VARIANT build
argument selecting the torch wheel index, constraints.txt for every other package, no
secret-looking ENV/ARG and a reason above every ``hadolint ignore``. Each rule is also
run on a known-bad Dockerfile to show it can fail. When a ``hadolint`` binary is on
PATH (or named by $HADOLINT) it is run as well.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "images").glob("Dockerfile.*"))
SECRET_NAME = re.compile(
    r"(PASSWORD|PASSWD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY|API_KEY)", re.I
)


@dataclass
class Instruction:
    """One Dockerfile instruction with its continuation lines joined."""

    keyword: str
    args: str
    line: int
    comments: list[str] = field(default_factory=list)


def parse_dockerfile(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions, keeping the comment block above each."""
    instructions: list[Instruction] = []
    comments: list[str] = []
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and stripped.startswith("#"):
            comments.append(stripped.lstrip("#").strip())
            continue
        if not pending and not stripped:
            comments = []
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        pending += " " + stripped.rstrip("\\").strip()
        if stripped.endswith("\\"):
            continue
        keyword, _, args = pending.strip().partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start, comments))
        pending, comments = "", []
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Instructions grouped by build stage (each group starts with its FROM)."""
    groups: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            groups.append([])
        if groups:
            groups[-1].append(instruction)
    return groups


def _run_commands(instruction: Instruction) -> list[str]:
    """The shell commands of a RUN instruction, split on && ; and ||."""
    return [
        part.strip()
        for part in re.split(r"&&|\|\||;", instruction.args)
        if part.strip()
    ]


def _pip_installs(instructions: list[Instruction]) -> list[str]:
    commands = [c for i in instructions if i.keyword == "RUN" for c in _run_commands(i)]
    return [c for c in commands if re.search(r"\bpip3?\s+install\b", c)]


def rule_base_image_pinned(instructions: list[Instruction]) -> list[str]:
    """DL3006/DL3007: every external FROM names an exact tag or digest, never latest."""
    problems = []
    aliases: set[str] = set()
    for instruction in (i for i in instructions if i.keyword == "FROM"):
        words = [w for w in instruction.args.split() if not w.startswith("--")]
        image = words[0]
        is_stage = image in aliases  # FROM an earlier stage of this file
        if len(words) >= 3 and words[1].lower() == "as":
            aliases.add(words[2])
        if is_stage:
            continue
        name = image.rsplit("/", 1)[-1]
        if "@sha256:" in image:
            continue
        if ":" not in name:
            problems.append(f"line {instruction.line}: FROM {image} has no tag")
        elif name.split(":", 1)[1] == "latest":
            problems.append(f"line {instruction.line}: FROM {image} uses latest")
    return problems


def rule_user_numeric_non_root(instructions: list[Instruction]) -> list[str]:
    """DL3002: the final stage switches to a numeric, non-zero uid (and gid)."""
    final = stages(instructions)[-1]
    users = [i for i in final if i.keyword == "USER"]
    if not users:
        return ["the final stage has no USER: the container would run as root"]
    uid, _, gid = users[-1].args.partition(":")
    problems = []
    for label, value in (("uid", uid), ("gid", gid or "1")):
        if not value.isdigit():
            problems.append(f"USER {users[-1].args}: {label} {value!r} is not numeric")
        elif int(value) == 0:
            problems.append(f"USER {users[-1].args}: {label} 0 is root")
    return problems


def rule_copy_not_add(instructions: list[Instruction]) -> list[str]:
    """DL3020: COPY files; ADD fetches URLs and unpacks archives implicitly."""
    return [f"line {i.line}: ADD {i.args}" for i in instructions if i.keyword == "ADD"]


def rule_pip_no_cache(instructions: list[Instruction]) -> list[str]:
    """DL3042: pip keeps no download cache in the image."""
    return [
        f"pip without --no-cache-dir: {c}"
        for c in _pip_installs(instructions)
        if "--no-cache-dir" not in c
    ]


def rule_pip_pinned(instructions: list[Instruction]) -> list[str]:
    """DL3013: each pip install pins with == or installs under constraints.txt."""
    problems = []
    for command in _pip_installs(instructions):
        words = shlex.split(command)
        if "-c" in words or any(w.startswith("--constraint") for w in words):
            continue
        options_with_value = {"--index-url", "-i", "--extra-index-url", "-r", "-c"}
        packages = [
            w
            for prev, w in zip(["", *words[:-1]], words, strict=True)
            if not w.startswith("-") and prev not in options_with_value
        ][2:]  # drop "pip" and "install"
        problems += [
            f"unpinned package {p!r} in: {command}"
            for p in packages
            if "==" not in p and not p.startswith((".", "/"))
        ]
    return problems


def rule_uses_constraints(instructions: list[Instruction]) -> list[str]:
    """Ours: the project itself is installed with -c constraints.txt."""
    if any("-c constraints.txt" in c for c in _pip_installs(instructions)):
        return []
    return ["no pip install uses -c constraints.txt"]


def rule_apt_hygiene(instructions: list[Instruction]) -> list[str]:
    """DL3008/DL3009/DL3015: install -y --no-install-recommends, lists removed."""
    problems = []
    for instruction in (i for i in instructions if i.keyword == "RUN"):
        text = instruction.args
        if re.search(r"apt-get\s+(dist-)?upgrade", text):
            problems.append(f"line {instruction.line}: apt-get upgrade in the image")
        if not re.search(r"apt-get\s+install", text):
            continue
        if "--no-install-recommends" not in text:
            problems.append(
                f"line {instruction.line}: install lacks --no-install-recommends"
            )
        if not re.search(r"\s-y\b|--yes|-qq?y", text):
            problems.append(f"line {instruction.line}: apt-get install without -y")
        if "rm -rf /var/lib/apt/lists/*" not in text:
            problems.append(
                f"line {instruction.line}: apt lists not removed in the same RUN"
            )
    return problems


def rule_exec_form(instructions: list[Instruction]) -> list[str]:
    """DL3025: CMD and ENTRYPOINT in JSON (exec) form, so signals reach the process."""
    problems = []
    for instruction in (i for i in instructions if i.keyword in {"CMD", "ENTRYPOINT"}):
        try:
            parsed = json.loads(instruction.args)
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, list):
            problems.append(
                f"line {instruction.line}: {instruction.keyword} is not exec form"
            )
    return problems


def rule_no_cd_or_sudo(instructions: list[Instruction]) -> list[str]:
    """DL3003/DL3004: WORKDIR instead of cd; no sudo."""
    problems = []
    for instruction in (i for i in instructions if i.keyword == "RUN"):
        for command in _run_commands(instruction):
            first = command.split()[0]
            if first in {"cd", "sudo"}:
                problems.append(f"line {instruction.line}: {first} in RUN")
    return problems


def rule_healthcheck(instructions: list[Instruction]) -> list[str]:
    """Ours: a HEALTHCHECK, or HEALTHCHECK NONE with its reason in a comment above."""
    checks = [i for i in stages(instructions)[-1] if i.keyword == "HEALTHCHECK"]
    if not checks:
        return ["no HEALTHCHECK (or HEALTHCHECK NONE with a stated reason)"]
    check = checks[-1]
    if check.args.upper() == "NONE" and not any(c for c in check.comments):
        return [
            f"line {check.line}: HEALTHCHECK NONE without a comment giving the reason"
        ]
    return []


def rule_torch_variant(instructions: list[Instruction]) -> list[str]:
    """Ours: ARG TORCH_VARIANT picks the torch wheel index (CPU or a CUDA build)."""
    declared = any(
        i.keyword == "ARG" and i.args.startswith("TORCH_VARIANT=") for i in instructions
    )
    used = any(
        "download.pytorch.org/whl/${TORCH_VARIANT}" in c
        for c in _pip_installs(instructions)
    )
    if declared and used:
        return []
    return ["ARG TORCH_VARIANT must be declared and used as the torch --index-url"]


def rule_no_secrets(instructions: list[Instruction]) -> list[str]:
    """Ours: no ENV or ARG that looks like a credential (they stay in image history)."""
    problems = []
    for instruction in (i for i in instructions if i.keyword in {"ENV", "ARG"}):
        names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", instruction.args) or [
            instruction.args.split()[0]
        ]
        problems += [
            f"line {instruction.line}: {instruction.keyword} {n} looks like a secret"
            for n in names
            if SECRET_NAME.search(n)
        ]
    return problems


def rule_waivers_have_reasons(text: str) -> list[str]:
    """Ours: every `# hadolint ignore=...` has a comment line with its reason above."""
    lines = text.splitlines()
    problems = []
    for index, line in enumerate(lines):
        if "hadolint ignore=" not in line:
            continue
        above = lines[index - 1].strip() if index else ""
        if not above.startswith("#") or len(above.lstrip("#").strip()) < 10:
            problems.append(f"line {index + 1}: {line.strip()} has no reason above it")
    return problems


InstructionRule = Callable[[list[Instruction]], list[str]]
RULES: dict[str, InstructionRule] = {
    "base-image-pinned": rule_base_image_pinned,
    "user-numeric-non-root": rule_user_numeric_non_root,
    "copy-not-add": rule_copy_not_add,
    "pip-no-cache": rule_pip_no_cache,
    "pip-pinned": rule_pip_pinned,
    "uses-constraints": rule_uses_constraints,
    "apt-hygiene": rule_apt_hygiene,
    "exec-form": rule_exec_form,
    "no-cd-or-sudo": rule_no_cd_or_sudo,
    "healthcheck": rule_healthcheck,
    "torch-variant": rule_torch_variant,
    "no-secrets": rule_no_secrets,
}

GOOD = """\
FROM python:3.11.13-slim-bookworm AS builder
ARG TORCH_VARIANT=cpu
RUN pip install --no-cache-dir --index-url \\
    "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==2.13.0"
RUN pip install --no-cache-dir -c constraints.txt .
FROM python:3.11.13-slim-bookworm
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
# batch container: nothing to probe
HEALTHCHECK NONE
CMD ["python", "-m", "serving"]
"""

# One known-bad Dockerfile per rule: GOOD with a single line changed.
BAD = {
    "base-image-pinned": GOOD.replace(
        "FROM python:3.11.13-slim-bookworm\n", "FROM python:latest\n"
    ),
    "user-numeric-non-root": GOOD.replace("USER 10001:10001", "USER shopml"),
    "copy-not-add": GOOD.replace(
        "COPY --from=builder",
        "ADD https://example.org/venv.tgz /opt/venv\nCOPY --from=builder",
    ),
    "pip-no-cache": GOOD.replace("--no-cache-dir -c", "-c"),
    "pip-pinned": GOOD.replace('"torch==2.13.0"', "torch"),
    "uses-constraints": GOOD.replace("-c constraints.txt .", '"shopml==0.1.0"'),
    "apt-hygiene": GOOD.replace(
        "USER 10001", "RUN apt-get update && apt-get install -y curl\nUSER 10001"
    ),
    "exec-form": GOOD.replace(
        'CMD ["python", "-m", "serving"]', "CMD python -m serving"
    ),
    "no-cd-or-sudo": GOOD.replace("USER 10001", "RUN cd /app && make\nUSER 10001"),
    "healthcheck": GOOD.replace("# batch container: nothing to probe\n", ""),
    "torch-variant": GOOD.replace("${TORCH_VARIANT}", "cpu"),
    "no-secrets": GOOD.replace(
        "ARG TORCH_VARIANT=cpu", "ARG TORCH_VARIANT=cpu\nENV AWS_SECRET_ACCESS_KEY=abc"
    ),
}


def test_dockerfiles_exist() -> None:
    names = {path.name for path in DOCKERFILES}
    assert names == {"Dockerfile.components", "Dockerfile.serving"}


@pytest.mark.parametrize("rule_name", sorted(RULES))
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_follows_rule(dockerfile: Path, rule_name: str) -> None:
    instructions = parse_dockerfile(dockerfile.read_text())
    assert RULES[rule_name](instructions) == []


@pytest.mark.parametrize("rule_name", sorted(RULES))
def test_rule_accepts_the_good_sample(rule_name: str) -> None:
    assert RULES[rule_name](parse_dockerfile(GOOD)) == []


@pytest.mark.parametrize("rule_name", sorted(BAD))
def test_rule_catches_a_violation(rule_name: str) -> None:
    assert BAD[rule_name] != GOOD, "the bad sample must differ from the good one"
    problems = RULES[rule_name](parse_dockerfile(BAD[rule_name]))
    assert problems, f"rule {rule_name} did not flag its known-bad sample"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_waivers_state_a_reason(dockerfile: Path) -> None:
    assert rule_waivers_have_reasons(dockerfile.read_text()) == []


def test_waiver_without_reason_is_caught() -> None:
    text = "FROM python:3.11.13-slim\n# hadolint ignore=DL3008\nRUN true\n"
    assert rule_waivers_have_reasons(text) == [
        "line 2: # hadolint ignore=DL3008 has no reason above it"
    ]


def test_parser_joins_continuation_lines() -> None:
    text = "FROM a:1\n# why\nRUN pip install \\\n    --no-cache-dir x==1\n"
    run = parse_dockerfile(text)[1]
    assert (run.keyword, run.line, run.comments) == ("RUN", 3, ["why"])
    assert run.args == "pip install --no-cache-dir x==1"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_survive_dockerignore(dockerfile: Path) -> None:
    """Everything the Dockerfile copies from the context is re-included after `**`."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "**", ".dockerignore must start by excluding everything"
    included = {p[1:].split("/")[0] for p in patterns if p.startswith("!")}
    for instruction in parse_dockerfile(dockerfile.read_text()):
        if instruction.keyword != "COPY" or "--from=" in instruction.args:
            continue
        for source in instruction.args.split()[:-1]:
            assert source.rstrip("/").split("/")[0] in included, f"{source} is ignored"


def _hadolint() -> str | None:
    return os.environ.get("HADOLINT") or shutil.which("hadolint")


@pytest.mark.skipif(
    _hadolint() is None, reason="no hadolint binary on PATH or in $HADOLINT"
)
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_reports_nothing(dockerfile: Path) -> None:
    binary = _hadolint()
    assert binary is not None
    result = subprocess.run(
        [binary, "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
