"""Every command in the fenced code blocks of README.md and docs/*.md runs as written.

Each fenced block is classified by an HTML comment on the line before its opening fence:

    <!-- doc-test: run -->               every command runs, in order, in one temp dir, on CPU
                                         (at tiny size: see RUN_SUBSTITUTIONS); exit 0 expected
    <!-- doc-test: check -->             every command is checked without running it: the module
                                         or script exists and its own argument parser accepts the
                                         arguments as written; the training overrides of
                                         `launch/train.py`, `sbatch train.sbatch`, `docker run`,
                                         `memory_plan` and `demo` compose with Hydra and pass
                                         validation (paths not checked); make targets exist;
                                         torchrun / deepspeed options parse with their parsers;
                                         `docker build --build-arg`s are ARGs of the Dockerfile.
                                         The cheap ones in RUN_ALSO also run.
    <!-- doc-test: synopsis -->          a usage line: `[optional]` parts, `{a,b}` and `a|b`
                                         choices and `...` allowed, then checked as `check`,
                                         except that training overrides are checked for their
                                         keys only (values may be placeholders: `<mode>`, `N`)
    <!-- doc-test: skip (reason) -->     not commands (a tree, yaml, python, output) or not
                                         checkable here; the reason is required

(or, for files this test's authors may not edit, an entry in REGISTRY below). A block with
neither fails, saying how to classify it. Checking is in-process (argparse is stopped right
after parsing, so nothing runs); `run` blocks also run in-process (runpy), one import of torch.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"<!--\s*doc-test:\s*(run|check|synopsis|skip)\s*(?:\((.*)\))?\s*-->")
HOW = (
    "put one of these on the line before its opening ``` fence:\n"
    "  <!-- doc-test: run -->              (cheap on CPU: runs in a temp dir, see tests/test_doc_commands.py)\n"
    "  <!-- doc-test: check -->            (commands checked without running: module, flags, Hydra overrides)\n"
    "  <!-- doc-test: synopsis -->         (a usage line with [optional] parts / {a,b} choices)\n"
    "  <!-- doc-test: skip (the reason) --> (not commands, or not checkable here)"
)

# Blocks of files this test's authors could not edit when it was written (others were editing
# them): (file, first line of the block) -> (kind, reason). A marker in the file takes
# precedence; moving these into markers is welcome.
REGISTRY: dict[tuple[str, str], tuple[str, str | None]] = {
    ("docs/training.md", "deepspeed --num_gpus 8 launch/train.py +recipe=janus_pro_7b model.init_from=/ckpt/Janus-Pro-7B data.root=/data ..."): ("check", None),
    ("docs/training.md", "checkpoints/step_00001000/"): ("skip", "a directory tree"),
    ("docs/training.md", "python launch/train.py +recipe=janus_pro_1b model.init_from=/ckpt/Janus-Pro-1B finetune.mode=lora \\"): ("check", None),
    ("docs/model.md", "# whole weights: base + adapters merged (any of hf, native; deepseek for JanusFlow)"): ("check", None),
    ("docs/model.md", "from peft import PeftModel"): ("skip", "Python; tests/models/test_lora_export.py runs it"),
    ("docs/training.md", "cd runs/my_run/checkpoints/step_00001000"): (
        "skip",
        "runs DeepSpeed's zero_to_fp32.py inside a checkpoint; tests/training/test_resume_edges.py runs it",
    ),
}

# `run` blocks at tiny size: (pattern, replacement) applied in order to each command. Sizes only,
# and placeholders the reader fills in (CKPT: a Janus-Pro checkpoint with its VQ tokenizer;
# FLOW_CKPT, VAE: a JanusFlow checkpoint and a diffusers VAE).
RUN_SUBSTITUTIONS: list[tuple[str, str]] = [
    (r"--n 10000\b", "--n 8 --image-size 64"),
    (r"--image-size 64 --image-size 64", "--image-size 64"),
    (r"--seq-len \d+ --global-batch \d+ --dp-size \d+ --steps \d+", "--seq-len 512 --global-batch 4 --dp-size 2 --steps 1"),
    (r"\bFLOW_CKPT\b", "{flow_ckpt}"),
    (r"--vae VAE\b", "--vae {vae}"),
    (r"\bCKPT\b", "{ckpt}"),
]


@dataclass
class Block:
    file: str
    line: int  # of the opening fence, 1-based
    lang: str
    lines: list[str]
    kind: str | None
    reason: str | None

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def blocks() -> list[Block]:
    out = []
    for path in DOCS:
        rel = str(path.relative_to(ROOT))
        lines = path.read_text().split("\n")
        i = 0
        while i < len(lines):
            m = re.match(r"^(\s*)(```+|~~~+)(.*)$", lines[i])
            if not m:
                i += 1
                continue
            fence, start = m.group(2), i
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(fence):
                j += 1
            body = lines[start + 1 : j]
            kind = reason = None
            k = start - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            mk = MARK.search(lines[k]) if k >= 0 else None
            if mk:
                kind, reason = mk.group(1), mk.group(2)
            elif body and (rel, body[0].strip()) in REGISTRY:
                kind, reason = REGISTRY[(rel, body[0].strip())]
            out.append(Block(rel, start + 1, m.group(3).strip(), body, kind, reason))
            i = j + 1
    return out


BLOCKS = blocks()


def commands(block: Block) -> list[str]:
    """Shell commands of a block: continuation lines joined, comment lines dropped."""
    cmds, cur = [], ""
    for line in block.lines:
        if not cur and (not line.strip() or line.strip().startswith("#")):
            continue
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        cmds.append(cur.strip())
        cur = ""
    if cur:
        cmds.append(cur.strip())
    return cmds


# ---- checking a command without running it ----------------------------------------------------


class _Parsed(Exception):
    pass


@contextlib.contextmanager
def _stop_after_parse():
    """argparse parses as usual (exit 2 with its message on a bad argument), then stops the
    program before it does anything."""
    orig = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        ns = orig(self, args, namespace)
        raise _Parsed(ns)

    argparse.ArgumentParser.parse_args = parse_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = orig


def _run_main(target: str, argv: list[str], is_module: bool) -> tuple[int, str]:
    """Run `python -m target argv` / `python target argv` in this process: (exit code, stderr)."""
    import signal

    old_argv, old_path = sys.argv[:], sys.path[:]
    # launch/train.py installs SIGTERM/SIGUSR1 handlers first thing: give pytest its own back
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    err = io.StringIO()
    code = 0
    sys.argv = [target, *argv]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if is_module:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                sys.path.insert(0, str(Path(target).resolve().parent))
                runpy.run_path(target, run_name="__main__")
    except _Parsed:
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            err.write(str(e.code))
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
        for sig, h in handlers.items():
            signal.signal(sig, h)
    return code, err.getvalue()


def _check_python_target(target: str, argv: list[str], is_module: bool, keys_only: bool = False) -> None:
    import importlib.util

    if is_module:
        assert importlib.util.find_spec(target) is not None, f"no module {target}"
    else:
        assert (ROOT / target).is_file(), f"no file {target}"
        if Path(target).name == "train.py" and Path(target).parent.name == "launch":
            return _check_train_overrides(argv, keys_only)
    if target == "pytest":  # the test paths exist (running pytest here would run them)
        for a in argv:
            if not a.startswith("-"):
                assert (ROOT / a.split("::")[0]).exists(), f"no test path {a}"
        return
    with _stop_after_parse():
        code, err = _run_main(target if is_module else str(ROOT / target), argv, is_module)
    assert code == 0, f"its argument parser refuses {argv}: {err.strip()[-600:]}"
    # CLIs whose positional arguments are training overrides
    if target == "janus_train.tools.memory_plan":
        _check_train_overrides(_positionals(argv), keys_only)
    elif target == "janus_train.tools.demo":
        recipe = argv[argv.index("--recipe") + 1] if "--recipe" in argv else "tiny_demo"
        _check_train_overrides([f"+recipe={recipe}", *_positionals(argv)], keys_only)


def _positionals(argv: list[str]) -> list[str]:
    """Arguments that are Hydra overrides (key=value), skipping options and their values."""
    return [a for a in argv if "=" in a and not a.startswith("-")]


def _check_train_overrides(argv: list[str], keys_only: bool = False) -> None:
    from janus_train.training.config import load_config, validate_config

    overrides, it = [], iter(argv)
    for a in it:
        if a == "--cfg":
            assert next(it, None) in ("job", "all"), "--cfg takes job or all"
        elif a in ("--check",) or a.startswith("--cfg="):
            continue
        else:
            assert not a.startswith("-"), f"launch/train.py takes Hydra overrides, not {a}"
            overrides.append(a)
    if not keys_only:
        validate_config(load_config(overrides), check_paths=False, complete=False)
        return
    # a synopsis: recipe and group choices compose; every other key exists (values are placeholders)
    from omegaconf import OmegaConf

    groups = [o for o in overrides if o.startswith("+") or "/" in o.split("=")[0]]
    cfg = load_config(groups)
    for o in overrides:
        if o in groups:
            continue
        key = o.split("=", 1)[0].lstrip("~+")
        assert OmegaConf.select(cfg, key, default="__missing__") != "__missing__", f"no config key {key}"


def _make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.MULTILINE))


def _after_launcher(launcher: str, argv: list[str]) -> None:
    """torchrun / deepspeed options parse with the launcher's own parser; then the program."""
    if launcher == "torchrun":
        from torch.distributed.run import get_args_parser

        ns = get_args_parser().parse_args(argv)
        _check_python_target(ns.training_script, ns.training_script_args, ns.module)
    else:
        from deepspeed.launcher.runner import parse_args

        ns = parse_args(argv)
        _check_python_target(ns.user_script, ns.user_args, False)


DOCKER_VALUE_OPTS = {"-v", "--volume", "-e", "--env", "--entrypoint", "--gpus", "-w", "--workdir", "--name", "--shm-size", "--network", "-t", "--tag", "--build-arg", "-f", "--file", "--target"}


def check_command(argv: list[str], keys_only: bool = False) -> None:
    env: dict[str, str] = {}
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):  # FOO=bar cmd ...
        k, v = argv[0].split("=", 1)
        env[k] = v
        argv = argv[1:]
    if argv[:1] == ["/usr/bin/time"]:
        argv = argv[3:] if argv[1:2] == ["-f"] else argv[1:]
    prog, args = argv[0], argv[1:]
    if prog in ("python", "python3", ".venv/bin/python"):
        if args[0] == "-m":
            return _check_python_target(args[1], args[2:], True, keys_only)
        return _check_python_target(args[0], args[1:], False, keys_only)
    if prog in ("torchrun", "deepspeed"):
        return _after_launcher(prog, args)
    if prog == "make":
        targets = [a for a in args if "=" not in a and not a.startswith("-")]
        missing = set(targets) - _make_targets()
        assert not missing, f"Makefile has no target {sorted(missing)}"
        demo_args = [a.split("=", 1)[1] for a in args if a.startswith("DEMO_ARGS=")]
        if demo_args:  # make demo DEMO_ARGS='...' passes them to janus_train.tools.demo
            recipe = ["--recipe", "janusflow_tiny_demo"] if "demo-flow" in targets else []
            _check_python_target("janus_train.tools.demo", [*recipe, *shlex.split(demo_args[-1])], True)
        return
    if prog == "sbatch":
        rest = [a for a in args if not a.startswith("--")]
        assert (ROOT / rest[0]).is_file(), f"no file {rest[0]}"
        if Path(rest[0]).name == "pretokenize.sbatch":  # its arguments are the pretokenizer's
            kind = env.get("JANUS_PRETOKENIZER", "vq")
            return _check_python_target(f"data_pipelines.pretokenize_{kind}", args[args.index(rest[0]) + 1 :], True)
        return _check_train_overrides(rest[1:])
    if prog == "docker":
        sub, rest = args[0], args[1:]
        opts, i = {}, 0
        while i < len(rest) and rest[i].startswith("-"):
            if "=" in rest[i]:
                k, v = rest[i].split("=", 1)
                opts.setdefault(k, []).append(v)
            elif rest[i] in DOCKER_VALUE_OPTS:
                opts.setdefault(rest[i], []).append(rest[i + 1])
                i += 1
            i += 1
        if sub == "build":
            dockerfile = (ROOT / "Dockerfile").read_text()
            for kv in opts.get("--build-arg", []):
                assert re.search(rf"^ARG {re.escape(kv.split('=')[0])}\b", dockerfile, re.MULTILINE), f"Dockerfile has no ARG {kv}"
            return
        assert sub == "run", f"docker {sub}: not checked here"
        image, cmd = rest[i], rest[i + 1 :]
        assert image.split(":")[0].endswith("janus-train"), image
        entry = opts.get("--entrypoint", [None])[-1]
        if entry == "torchrun":
            return _after_launcher("torchrun", cmd)
        assert entry is None, f"entrypoint {entry}: not checked here"
        return _check_train_overrides(cmd)  # the image's entry point is launch/train.py
    if prog == "cd":
        return
    raise AssertionError(f"{prog}: a program this test does not know; teach check_command or classify the block as skip (reason)")


def synopsis_to_argv(argv: list[str]) -> list[str]:
    out = []
    for a in argv:
        a = a.strip("[]")
        if not a or a == "...":
            continue
        a = re.sub(r"\{([^,{}]+),[^{}]*\}", r"\1", a)  # {hf,deepseek} -> hf
        if "|" in a and not a.startswith("'"):
            a = re.sub(r"([^=|]+)(\|[^=|]+)+$", r"\1", a)  # keep|fp32 -> keep
        out.append(a)
    return out


def _argv(cmd: str, synopsis: bool) -> list[str]:
    argv = shlex.split(cmd, comments=True)
    argv = [a for a in argv if a != "..."]
    return synopsis_to_argv(argv) if synopsis else argv


# ---- the tests --------------------------------------------------------------------------------


def test_every_block_is_classified():
    bad = [f"{b.id} ({(b.lines or [''])[0].strip()[:60]!r})" for b in BLOCKS if b.kind is None]
    assert not bad, "unclassified code blocks:\n  " + "\n  ".join(bad) + "\n" + HOW
    no_reason = [b.id for b in BLOCKS if b.kind == "skip" and not (b.reason or "").strip()]
    assert not no_reason, f"`skip` needs a reason, as <!-- doc-test: skip (why) -->: {no_reason}"
    not_shell = [b.id for b in BLOCKS if b.kind != "skip" and b.lang not in ("", "bash", "sh", "shell", "console")]
    assert not not_shell, f"blocks in another language must be `skip (reason)`: {not_shell}"


CHECKED = [b for b in BLOCKS if b.kind in ("check", "synopsis", "run")]


@pytest.mark.parametrize("block", CHECKED, ids=[b.id for b in CHECKED])
def test_commands_check(block):
    """Module/script exists and its parser accepts the arguments; Hydra overrides compose."""
    failures = []
    for cmd in commands(block):
        try:
            check_command(_argv(cmd, block.kind == "synopsis"), keys_only=block.kind == "synopsis")
        except Exception as e:  # noqa: BLE001 -- collect every failure of the block
            failures.append(f"  {cmd}\n    -> {type(e).__name__}: {str(e).strip()[:800]}")
    assert not failures, f"{block.id}: commands that do not run as written:\n" + "\n".join(failures)


RUN = [b for b in BLOCKS if b.kind == "run"]


@pytest.fixture(scope="module")
def flow_placeholders(tmp_path_factory):
    """A tiny JanusFlow checkpoint and a tiny diffusers VAE (FLOW_CKPT, VAE)."""
    import torch

    from janus_train.tools.make_tiny_checkpoint import make_tiny_checkpoint
    from janus_train.training.tokenizer import tiny_vae

    root = tmp_path_factory.mktemp("doc_flow")
    make_tiny_checkpoint(root / "flow", fmt="deepseek", family="janusflow", preset="janusflow_tiny", seed=0)
    torch.manual_seed(0)
    tiny_vae(latent_channels=4, downsample=8, width=8, sample_size=64).save_pretrained(str(root / "vae"))
    return {"flow_ckpt": str(root / "flow"), "vae": str(root / "vae")}


@pytest.fixture
def placeholders(request, tiny_hf_ckpt):
    out = {"ckpt": str(tiny_hf_ckpt)}
    block = request.node.callspec.params.get("block")
    if block is not None and any("FLOW_CKPT" in c for c in commands(block)):
        out.update(request.getfixturevalue("flow_placeholders"))
    return out


def _run(where: str, cmd: str, placeholders: dict[str, str]) -> None:
    run = cmd
    for pat, rep in RUN_SUBSTITUTIONS:
        run = re.sub(pat, lambda m, rep=rep: rep.format(**placeholders), run)
    argv = shlex.split(run, comments=True)
    assert argv[0] in ("python", ".venv/bin/python"), f"{where}: `run` runs python commands only: {cmd}"
    if argv[1] == "-m":
        code, err = _run_main(argv[2], argv[3:], True)
    else:
        code, err = _run_main(str(ROOT / argv[1]), argv[2:], False)
    assert code in (0, None), f"{where}: `{cmd}` (run as `{run}`) exited {code}:\n{err[-2000:]}"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_run_blocks(block, tmp_path, monkeypatch, placeholders):
    """`run` blocks: every command, in order, in one temp dir."""
    monkeypatch.chdir(tmp_path)
    for cmd in commands(block):
        _run(block.id, cmd, placeholders)


# Commands of `check` blocks that are cheap enough to run as well (seconds, in-process).
RUN_ALSO = [
    r"^python -m janus_train\.models\.summary \w+\s*$",
    r"^python -m janus_train\.tools\.make_tiny_checkpoint \S+ --format hf$",
    r"^python launch/train\.py \+recipe=\w+ --cfg job$",
]
ALSO = [(b, c) for b in BLOCKS if b.kind == "check" for c in commands(b) if any(re.match(p, shlex.join(shlex.split(c, comments=True))) for p in RUN_ALSO)]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("block,cmd", ALSO, ids=[f"{b.id}:{c.split()[2]}" for b, c in ALSO])
def test_cheap_commands_of_check_blocks_run(block, cmd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _run(block.id, cmd, {"ckpt": "CKPT"})  # (no placeholders in these)


def test_run_also_finds_its_commands():
    """RUN_ALSO's patterns still match the docs (a reworded command would silently stop running)."""
    assert len(ALSO) >= 4, [c for _, c in ALSO]
