"""Every command printed in README.md and docs/*.md works as printed.

Fast (unmarked): each `mohge-train`/`torchrun`/`launch/torchrun.sh` command's config composes and
validates for the world size the command launches; --print-config/--dry-run, mohge-plan and
render commands run; shown error outputs match. Slow: the CPU commands train as printed (in a
temporary directory), and the conversion commands run on the resulting checkpoint.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from distributed import free_port

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Placeholders in the docs and what stands in for them here.
PLACEHOLDERS = {"$i": "0", "<0..3>": "0", "<node0-host>": "node0", "DIR": "tok", "runs/x": "runs/t"}
NOT_RUN_HERE = ("make ", "sbatch ", "python bench/")  # whole-project targets, a scheduler, benchmarks


def doc_commands() -> list[tuple[str, str]]:
    """(file, command) for each command in ```bash blocks (and `$ ` lines of other blocks),
    continuation lines joined."""
    found = []
    for path in DOCS:
        in_block, shell = False, False
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.startswith("```"):
                in_block, shell = not in_block, line.strip() in ("```bash", "```sh")
            elif in_block and (shell or line.startswith("$ ")):  # shell blocks, or `$ ` lines in others
                text = line[2:] if line.startswith("$ ") else line
                while text.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    text = text[:-1].rstrip() + " " + lines[i].strip()
                text = text.split("  #")[0].strip()
                words = text.split()
                start = next((w for w in words if "=" not in w), "")
                if start.startswith(("mohge-", "torchrun", "launch/", "python", "make", "sbatch")) and \
                        not text.startswith("mohge-train: "):
                    found.append((path.name, text))
            i += 1
    return found


def split(command: str) -> tuple[dict, list[str]]:
    """(environment assignments, argv) with placeholders and [optional args] resolved."""
    for key, value in PLACEHOLDERS.items():
        command = command.replace(key, value)
    command = re.sub(r" \[--[^\]]*\]", "", command)  # optional flags shown in brackets
    words = shlex.split(command)
    env = {}
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def train_invocation(env: dict, argv: list[str]):
    """(world size, mohge-train args) for a training command, or None."""
    if argv[0] == "mohge-train":
        return 1, argv[1:]
    if argv[0] == "torchrun":
        nproc = int(argv[argv.index("--nproc-per-node") + 1])
        return nproc, argv[argv.index("mohge.train.cli") + 1:]
    if argv[0] == "launch/torchrun.sh":
        return int(env.get("NPROC_PER_NODE", 8)) * int(env.get("NNODES", 1)), argv[1:]
    return None


COMMANDS = doc_commands()
# `$ mohge-train ...` lines of the docs followed by the error line the command prints.
SHOWN_ERRORS = {command: line for path in DOCS for command, line in
                re.findall(r"^\$ (mohge-train .*)\n(mohge-train: .*)$", path.read_text(), flags=re.M)}


def test_docs_have_commands_and_each_is_known():
    assert len(COMMANDS) >= 15
    known = ("mohge-train", "mohge-plan", "mohge-convert", "mohge-preprocess", "mohge-train-tokenizer",
             "mohge-eval", "mohge-lm-eval",
             "torchrun", "launch/torchrun.sh", "python -m mohge.launch.render", *NOT_RUN_HERE)
    for name, command in COMMANDS:
        _, argv = split(command)
        assert " ".join(argv).startswith(known), f"{name}: a command this test does not know: {command}"


# `model=imported` needs the preset the docs' previous line copies out of an import-hf run
# (tests/test_hf_import.py runs that path).
@pytest.mark.parametrize("name, command", [c for c in COMMANDS if train_invocation(*split(c[1]))
                                           and "model=imported" not in c[1]],
                         ids=lambda x: x if x.endswith(".md") else None)
def test_training_command_config_is_valid(name, command, capsys):
    """The config each training command composes validates for the world size it launches."""
    from mohge.train.cli import main

    world, args = train_invocation(*split(command))
    code = main(["--print-config", "--world-size", str(world), *[a for a in args if a != "--print-config"
                                                                  and a != "--dry-run"]])
    out, err = capsys.readouterr()
    if command in SHOWN_ERRORS:  # an example of an error: the line shown is the line printed
        assert code == 2 and err.strip() == SHOWN_ERRORS[command], f"{name}: {command}\n{err}"
    else:
        assert code == 0, f"{name}: {command}\n{err}"
        assert out.startswith(f"# layout: world {world} = ")


def test_error_examples_match(capsys):
    """The error lines README.md and docs/*.md show are what the tool prints."""
    from mohge.train.cli import main

    assert len(SHOWN_ERRORS) >= 3
    for command, line in SHOWN_ERRORS.items():
        assert main(shlex.split(command)[1:]) == 2
        assert capsys.readouterr().err.strip() == line


def test_plan_render_and_dry_run_commands_run(tmp_path, capsys, monkeypatch):
    from mohge.launch.render import main as render_main
    from mohge.parallel.plan_cli import main as plan_main
    from mohge.train.cli import main as train_main

    monkeypatch.chdir(tmp_path)
    ran = 0
    for name, command in COMMANDS:
        env, argv = split(command)
        if argv[0] == "mohge-plan":
            argv = [a for a in argv if "|" not in a]
            assert plan_main(argv[1:]) == 0, command
        elif argv[:3] == ["python", "-m", "mohge.launch.render"]:
            i = argv.index("--out-dir") + 1  # render creates it: keep it under tmp_path
            argv[i] = str(tmp_path / argv[i].lstrip("/"))
            assert render_main(argv[3:]) == 0, (command, capsys.readouterr().err)
            assert (tmp_path / "job.sbatch").exists()
        elif argv[0] == "mohge-train" and ("--dry-run" in argv or "--print-config" in argv):
            assert train_main(argv[1:]) == 0, command
        else:
            continue
        ran += 1
    assert ran >= 4


def _run(tmp_path, command: str, timeout: int = 400) -> subprocess.CompletedProcess:
    env, argv = split(command)
    bin_dir = Path(sys.executable).parent
    if argv[0] == "launch/torchrun.sh":
        argv = ["bash", str(ROOT / argv[0]), *argv[1:]]
        env.update(PYTHON=sys.executable, MASTER_PORT=str(free_port()))
    elif argv[0].startswith("mohge-"):
        argv = [str(bin_dir / argv[0]), *argv[1:]]
    proc = subprocess.run(argv, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_cpu_commands_train_as_printed(tmp_path):
    """README's tiny training command and the CPU multi-process command, as printed; then the
    conversion commands on the checkpoint the first one wrote."""
    readme = [c for n, c in COMMANDS if n == "README.md"]
    tiny = next(c for c in readme if c.startswith("mohge-train --config-name tiny_mohge out_dir=runs/t"))
    _run(tmp_path, tiny)
    assert (tmp_path / "runs/t/metrics.jsonl").exists()
    # import-hf needs a transformers model folder: tests/test_hf_import.py runs it on tiny ones
    for command in [c for c in readme if c.startswith("mohge-convert") and "import-hf" not in c]:
        _run(tmp_path, command)
    assert list((tmp_path / "export").glob("*.safetensors")) and (tmp_path / "runs/y").exists()
    cpu = next(c for c in readme if c.startswith("MOHGE_CPU=1"))
    _run(tmp_path, cpu)
    assert (tmp_path / "runs/tiny_mohge/metrics.jsonl").exists()
