"""Hub ids resolve through huggingface_hub's cache, as a user with network access would have it after a download."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from checkpoints import DATA
from llava_cli.errors import LlavaError
from llava_cli.hub import looks_like_path, resolve

REPO = "llava-hf/tiny-test-qwen"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tiny, tmp_path_factory):
    """A huggingface_hub cache holding one snapshot of a tiny checkpoint, laid out as snapshot_download leaves it."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    shutil.copytree(tiny("qwen").folder, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return cache


def run(*args, cache, offline=True, **extra_env):
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1" if offline else "0", **extra_env}
    cmd = [sys.executable, "-m", "llava_cli", "ask", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_a_cached_hub_id_runs_offline(hub_cache):
    p = run(str(DATA / "chelsea.png"), "What is this?", "-m", REPO, "-n", "4", "--json", cache=hub_cache)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["model"] == REPO


def test_a_complete_cache_is_used_without_asking_the_network(hub_cache):
    # HF_HUB_OFFLINE=0 and an endpoint that cannot answer: a complete cached snapshot must not need it.
    p = run("Hi", "-m", REPO, "--show-prompt", cache=hub_cache, offline=False, HF_ENDPOINT="http://127.0.0.1:9")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("<|im_start|>user\n")


def test_an_uncached_id_offline_says_how_to_pass_a_folder(hub_cache):
    p = run("Hi", "-m", "llava-hf/not-downloaded", cache=hub_cache)
    assert p.returncode == 1
    assert p.stderr.startswith("error: llava-hf/not-downloaded: not in the local cache") and "--model PATH" in p.stderr


@pytest.mark.parametrize("model,is_path", [
    ("llava-hf/llava-1.5-7b-hf", False), ("gpt2", False), ("./ckpt", True), ("/abs/ckpt", True), ("~/ckpt", True),
    ("a/b/c", True),
])
def test_what_counts_as_a_path(model, is_path):
    assert looks_like_path(model) is is_path


def test_a_file_is_not_a_checkpoint(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(LlavaError, match="is a file; give the checkpoint folder"):
        resolve(str(f))
