"""The top-level Dockerfile, checked without a Docker daemon (`make docker-check` runs this).

Syntax comes from BuildKit's own parser (the `dockerfile` package wraps it). On top of that
the checks below catch what a build would only find late or never: unknown instructions,
undeclared build args, a FROM that names no stage, COPY of something missing or excluded by
.dockerignore, and drift from the project: for each VARIANT the `pip install` extras must be
setup.py's (`[gpu]` for gpu, none for cpu), the torch pin must equal the Makefile's
TORCH_SPEC, and every package setup.py installs must be copied in. Where a daemon is running,
`docker build --check` lints the file too.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
                "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
VARIANTS = {"gpu": {"gpu"}, "cpu": set()}  # VARIANT -> the extras its pip install must name

dockerfile = pytest.importorskip("dockerfile", reason="pip install dockerfile (BuildKit's parser)")


def expand(text: str, env: dict[str, str], strict: bool = False) -> str:
    """Shell/Dockerfile variable expansion: $V, ${V}, ${V:-default}, ${V:+alternative}.

    An unknown plain $V raises KeyError if strict (FROM lines: build args must be declared),
    else stays as written (variables of the base image or the shell, such as $PATH).
    """
    def repl(m: re.Match) -> str:
        name = m.group("name") or m.group("bare")
        op, word = m.group("op"), m.group("word")
        value = env.get(name, "")
        if op == ":-":
            return value if value else expand(word, env, strict)
        if op == ":+":
            return expand(word, env, strict) if value else ""
        if name not in env:
            if strict:
                raise KeyError(name)
            return m.group(0)
        return value
    pattern = r"\$(?:\{(?P<name>\w+)(?:(?P<op>:[-+])(?P<word>[^}]*))?\}|(?P<bare>\w+))"
    return re.sub(pattern, repl, text)


def setup_py() -> tuple[set[str], list[str]]:
    """(extras names, find_packages include patterns) read from setup.py without running it."""
    tree = ast.parse((REPO / "setup.py").read_text())
    names = {n.targets[0].id: n.value for n in tree.body
             if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)}
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: k.value for k in call.keywords}
    extras_node = kw["extras_require"]
    if isinstance(extras_node, ast.Name):
        extras_node = names[extras_node.id]
    extras = set(ast.literal_eval(extras_node))
    include: list[str] = []
    for node in ast.walk(kw["packages"]):
        if isinstance(node, ast.keyword) and node.arg == "include":
            include = ast.literal_eval(node.value)
    return extras, include


def dockerignore() -> list[str]:
    path = REPO / ".dockerignore"
    lines = path.read_text().splitlines() if path.exists() else []
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    parts = Path(rel).parts
    for pat in patterns:
        pat = pat.lstrip("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatch(prefix, pat) or (pat.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pat[3:])):
                return True
    return False


@pytest.fixture(scope="module")
def commands():
    return dockerfile.parse_file(str(DOCKERFILE))


def stages(commands) -> list[dict]:
    """Split into stages: {'from': raw image, 'name': alias, 'cmds': [...]}; plus global ARGs."""
    out = []
    for c in commands:
        if c.cmd.upper() == "FROM":
            image = c.value[0]
            name = c.value[2] if len(c.value) == 3 and c.value[1].upper() == "AS" else None
            out.append({"from": image, "name": name, "cmds": []})
        elif out:
            out[-1]["cmds"].append(c)
    return out


def global_args(commands) -> dict[str, str]:
    args = {}
    for c in commands:
        if c.cmd.upper() == "FROM":
            break
        assert c.cmd.upper() == "ARG", f"line {c.start_line}: only ARG may come before the first FROM"
        key, _, default = c.value[0].partition("=")
        args[key] = default
    return args


def variant_chain(commands, variant: str) -> list[dict]:
    """The stages the final image is built from, base first, for one VARIANT."""
    all_stages = stages(commands)
    by_name = {s["name"]: s for s in all_stages if s["name"]}
    build_args = dict(global_args(commands), VARIANT=variant)
    chain = [all_stages[-1]]
    while True:
        parent = expand(chain[0]["from"], build_args, strict=True)
        if parent not in by_name:
            break
        chain.insert(0, by_name[parent])
    return chain


def stage_env(chain: list[dict], commands) -> dict[str, str]:
    """ENV and ARG defaults visible in the last stage (ARGs re-declared in a stage)."""
    env = {}
    for stage in chain:
        for c in stage["cmds"]:
            if c.cmd.upper() == "ENV":
                pairs = c.value
                for k, v in zip(pairs[::2], pairs[1::2]):
                    if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":  # Docker drops the quotes
                        v = v[1:-1]
                    env[k] = expand(v, env)
            elif c.cmd.upper() == "ARG":
                key, _, default = c.value[0].partition("=")
                env.setdefault(key, expand(default, env) if default else global_args(commands).get(key, ""))
    return env


def test_dockerfile_parses_and_uses_known_instructions(commands):
    assert commands, "empty Dockerfile"
    for c in commands:
        assert c.cmd.upper() in INSTRUCTIONS, f"line {c.start_line}: unknown instruction {c.cmd!r}"
        assert not c.heredocs, f"line {c.start_line}: heredocs need BuildKit; keep RUN lines plain"
        if c.cmd.upper() in ("CMD", "ENTRYPOINT", "SHELL"):
            assert c.json, f"line {c.start_line}: {c.cmd} should use the JSON (exec) form"


def test_build_args_declared_and_stages_resolve(commands):
    args = global_args(commands)
    assert {"VARIANT", "CUDA_BASE", "CPU_BASE"} <= set(args), args
    names = {s["name"] for s in stages(commands)}
    for variant in VARIANTS:
        for stage in stages(commands):
            try:
                image = expand(stage["from"], dict(args, VARIANT=variant), strict=True)
            except KeyError as e:
                raise AssertionError(f"FROM {stage['from']}: build arg {e} is not declared before FROM")
            assert image and " " not in image, stage
        chain = variant_chain(commands, variant)
        assert chain[0]["name"] == f"base-{variant}", f"VARIANT={variant} builds from {chain[0]['name']}"
        assert f"base-{variant}" in names


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pip_install_matches_setup_extras_and_torch_pin(commands, variant):
    extras, _ = setup_py()
    chain = variant_chain(commands, variant)
    env = stage_env(chain, commands)
    runs = [expand(" ".join(c.value), env) for s in chain for c in s["cmds"] if c.cmd.upper() == "RUN"]
    project = [r for r in runs if re.search(r"pip install .*(?:-e |\s)\"?\.(?:\[[^\]]*\])?\"?(?:\s|$)", r)]
    assert len(project) == 1, f"expected one pip install of the project, got {project}"
    m = re.search(r"\"?\.(?:\[(?P<extras>[^\]]*)\])?\"?(?:\s|$)", project[0].split("pip install", 1)[1])
    named = {e.strip() for e in (m.group("extras") or "").split(",") if e.strip()}
    assert named == VARIANTS[variant], f"VARIANT={variant} installs extras {named}, expected {VARIANTS[variant]}"
    assert named <= extras, f"extras {named - extras} are not in setup.py's extras_require {sorted(extras)}"

    torch_runs = [r for r in runs if re.search(r"pip install .*\"?torch==", r)]
    assert len(torch_runs) == 1, runs
    pin = re.search(r"torch==([\w.+]+)", torch_runs[0]).group(1)
    spec = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert pin == spec, f"Dockerfile installs torch=={pin}, the Makefile's TORCH_SPEC is torch=={spec}"
    assert torch_runs[0] in runs[: runs.index(project[0])], "torch must be installed before the project"
    if variant == "cpu":
        assert "/whl/cpu" in torch_runs[0], "the CPU variant must take torch from the CPU index"


def test_copy_sources_exist_and_cover_the_package(commands):
    patterns = dockerignore()
    copied = []
    for c in commands:
        if c.cmd.upper() in ("COPY", "ADD") and not any(f.startswith("--from") for f in c.flags):
            for src in c.value[:-1]:
                rel = src.rstrip("/")
                assert (REPO / rel).exists(), f"line {c.start_line}: COPY source {src} does not exist"
                assert not ignored(rel, patterns), f"line {c.start_line}: {src} is excluded by .dockerignore"
                copied.append(rel)
    _, include = setup_py()
    for pattern in include:  # e.g. "janus_train*": its top-level package must be in the image
        assert pattern.rstrip("*") in copied, f"setup.py packages {pattern} but the Dockerfile does not COPY it"
    assert "README.md" in copied, "setup.py reads README.md for long_description"
    for heavy in (".venv", ".git", "runs", "demo_out"):
        assert ignored(heavy, patterns), f".dockerignore should exclude {heavy}"


def test_entrypoint_runs_train_py(commands):
    entry = [c for c in commands if c.cmd.upper() == "ENTRYPOINT"]
    assert len(entry) == 1
    argv = list(entry[0].value)
    assert argv[0].startswith("python") and argv[1].endswith("launch/train.py"), argv
    workdir = [c.value[0] for c in commands if c.cmd.upper() == "WORKDIR"][-1]
    assert argv[1] == f"{workdir}/launch/train.py", (argv, workdir)


def _docker_daemon() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.skipif(not _docker_daemon(), reason="no Docker daemon: `docker build --check` needs one")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_docker_build_check(variant):
    res = subprocess.run(["docker", "build", "--check", "--build-arg", f"VARIANT={variant}", str(REPO)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr


def test_expand_helper():
    env = {"A": "gpu", "E": ""}
    assert expand(".${A:+[$A]}", env) == ".[gpu]"
    assert expand(".${E:+[$E]}", env) == "."
    assert expand("${MISSING:-x}/$A", env) == "x/gpu"
    assert expand("/opt/bin:$PATH", env) == "/opt/bin:$PATH"
    with pytest.raises(KeyError):
        expand("base-$NOPE", env, strict=True)
    assert json.dumps(expand("base-${A}", env)) == '"base-gpu"'
