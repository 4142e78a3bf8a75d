"""Shell completion: the committed scripts are what the app generates, installation works, values complete."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llava_cli import completions
from llava_cli.completions import SHELLS

ROOT = Path(__file__).resolve().parents[1]
REVISION = "0123456789abcdef0123456789abcdef01234567"
RUN_AS_LLAVA = "import sys; from llava_cli.cli import app; app(prog_name='llava')"  # the console script's name


def llava(*args, env=None, **extra_env):
    """`llava ARGS` as a real process named llava (completion keys on the program's name)."""
    env = {**os.environ, **(env or {}), **extra_env}
    return subprocess.run([sys.executable, "-c", RUN_AS_LLAVA, *args], capture_output=True, text=True, env=env,
                          timeout=60)


@pytest.mark.parametrize("shell", SHELLS)
def test_the_committed_scripts_are_what_the_app_generates_now(shell):
    committed = (ROOT / "completions" / f"llava.{shell}").read_text(encoding="utf-8")
    assert committed == completions.script(shell), "run: python3 -m llava_cli.completions --write"


def test_the_check_command_agrees():
    p = subprocess.run([sys.executable, "-m", "llava_cli.completions", "--check"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("shell", SHELLS)
def test_the_scripts_equal_show_completion(shell):
    p = llava("--show-completion", shell, _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    assert p.returncode == 0, p.stderr
    assert p.stdout == completions.script(shell)


@pytest.mark.parametrize("shell,installed", [
    ("bash", ".bash_completions/llava.sh"), ("zsh", ".zfunc/_llava"), ("fish", ".config/fish/completions/llava.fish"),
])
def test_install_completion(tmp_path, shell, installed):
    p = llava("--install-completion", shell, HOME=str(tmp_path), _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    assert p.returncode == 0, p.stderr
    assert f"{shell} completion installed in" in p.stdout
    assert (tmp_path / installed).read_text().strip() == completions.script(shell).strip()


def _complete_bash(line: str, **env) -> list[str]:
    words = line.split(" ")
    p = llava(COMP_WORDS=line, COMP_CWORD=str(len(words) - 1), _LLAVA_COMPLETE="complete_bash", **env)
    assert p.returncode == 0, p.stderr
    return p.stdout.split()


def test_commands_and_options_complete():
    assert {"ask", "info", "models", "presets"} <= set(_complete_bash("llava "))
    assert {"--preset", "--frames", "--box", "--format", "--json"} <= set(_complete_bash("llava ask --"))
    assert _complete_bash("llava ask --format m") == ["markdown"]


def test_preset_names_complete(tmp_path):
    (tmp_path / "llava" / "presets").mkdir(parents=True)
    (tmp_path / "llava" / "presets" / "my-own.yaml").write_text("max_tokens: 5\n")
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    assert _complete_bash("llava ask --preset ca", **env) == ["caption"]
    assert _complete_bash("llava ask --preset my", **env) == ["my-own"]
    assert {"vip-llava-7b", "vip-llava-13b"} == set(_complete_bash("llava presets vip", **env))
    assert _complete_bash("llava ask --preset ./", **env) == []  # a path: the shell completes file names


def test_model_ids_complete_from_the_hub_cache(tiny, tmp_path):
    for repo_id, source in (("llava-hf/tiny-qwen", tiny("qwen").folder), ("llava-hf/tiny-vip", tiny("vipllava").folder)):
        repo = tmp_path / ("models--" + repo_id.replace("/", "--"))
        shutil.copytree(source, repo / "snapshots" / REVISION)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(REVISION)
    other = tmp_path / "models--org--bert" / "snapshots" / REVISION
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    env = {"HF_HUB_CACHE": str(tmp_path)}
    assert _complete_bash("llava ask -m llava-hf/", **env) == ["llava-hf/tiny-qwen", "llava-hf/tiny-vip"]
    assert _complete_bash("llava ask --model llava-hf/tiny-v", **env) == ["llava-hf/tiny-vip"]
    assert _complete_bash("llava info llava", **env) == ["llava-hf/tiny-qwen", "llava-hf/tiny-vip"]
    assert _complete_bash("llava ask -m org", **env) == []  # not a LLaVA checkpoint
    assert _complete_bash("llava ask -m ./", **env) == []  # a path: the shell completes file names
    assert _complete_bash("llava ask -m x", HF_HUB_CACHE=str(tmp_path / "none")) == []


def test_a_real_bash_completes_through_the_committed_script(tmp_path):
    bash = shutil.which("bash")
    if not bash:
        pytest.skip("bash is not installed")
    shim = tmp_path / "bin" / "llava"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "{RUN_AS_LLAVA}" "$@"\n')
    shim.chmod(0o755)
    script = ROOT / "completions" / "llava.bash"
    probe = (f'source "{script}"; COMP_WORDS=(llava ask --preset oc); COMP_CWORD=3; '
             '_llava_completion llava; printf "%s\\n" "${COMPREPLY[@]}"')
    env = {**os.environ, "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}"}
    p = subprocess.run([bash, "--norc", "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["ocr"]


# What the startup paths must not import: torch and the model's libraries (seconds), and pydantic, which typer 0.29
# brought in to build a validator per option (~0.1 s of every `llava ... --help`; pyproject.toml keeps typer below).
HEAVY = ("torch", "PIL", "tokenizers", "safetensors", "huggingface_hub", "yaml", "pydantic")


@pytest.mark.parametrize("args,env", [
    (["--help"], {}),
    (["ask", "--help"], {}),
    (["chat", "--help"], {}),
    ([], {"COMP_WORDS": "llava ask --f", "COMP_CWORD": "2", "_LLAVA_COMPLETE": "complete_bash"}),
])
def test_help_and_completion_import_no_heavy_module(args, env):
    probe = (f"import sys\ntry:\n    {RUN_AS_LLAVA.split('; ', 1)[1]}\nexcept SystemExit:\n    pass\n"
             f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})), file=sys.stderr)")
    p = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60,
                       env={**os.environ, **env})
    assert p.stdout.strip(), p.stderr  # the help or the completions were printed
    assert p.stderr.strip().splitlines()[-1] == "[]", p.stderr
