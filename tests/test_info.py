"""`llava info` and `llava models`: what a checkpoint is and what the hub cache holds, as text and JSON."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors import safe_open

from checkpoints import HUBMETA
from llava_cli.cli import app

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache, repo_id, source=None, config=None):
    """A model repo in a huggingface_hub cache, laid out as snapshot_download leaves it (files in the snapshot)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    if source:
        shutil.copytree(source, snapshot)
    else:
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text(json.dumps(config))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tiny, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf") / "hub"
    _cache_repo(cache, "llava-hf/tiny-qwen", tiny("qwen").folder)
    _cache_repo(cache, "llava-hf/tiny-vip", tiny("vipllava").folder)
    partial = _cache_repo(cache, "llava-hf/tiny-partial", tiny("llava").folder)
    (partial / "model.safetensors").unlink()
    _cache_repo(cache, "google-bert/bert-base-uncased", config={"model_type": "bert"})
    return cache


def run(*args, cache, offline=True):
    """huggingface_hub reads its cache settings at import: a cache test runs `llava` as a real process."""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1" if offline else "0"}
    return subprocess.run([sys.executable, "-m", "llava_cli", *args], capture_output=True, text=True, env=env, timeout=120)


def _numel(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel")
                   else _prod(f.get_slice(k).get_shape()) for k in f.keys())


def _prod(shape):
    n = 1
    for d in shape:
        n *= d
    return n


@pytest.mark.parametrize("family,template,image_tokens,vision", [
    ("qwen", "interleave-qwen", 16, "siglip_vision_model"),
    ("llava", "llava-1.5", 16, "clip_vision_model"),
    ("vipllava", "vip-llava", 16, "clip_vision_model"),
])
def test_info_of_a_local_checkpoint(runner, tiny, family, template, image_tokens, vision):
    folder = tiny(family).folder
    r = runner.invoke(app, ["info", str(folder), "--json"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    assert rec["family"] == rec["template"] == template
    assert rec["image_tokens"] == image_tokens and rec["context_length"] == 512
    assert rec["vision_tower"]["type"] == vision and rec["vision_tower"]["image_size"] == 56
    assert rec["parameters"] == _numel(folder) and rec["parameters_exact"]
    assert rec["size_on_disk"] == sum(p.stat().st_size for p in folder.iterdir()) and rec["weights_present"]
    assert rec["dtype_auto"] in ("float32", "bfloat16")
    text = runner.invoke(app, ["info", str(folder)]).stdout
    for label in ("family", "template", "vision tower", "image tokens", "context length", "dtype", "parameters",
                  "size on disk"):
        assert f"\n{label} " in "\n" + text
    assert f"{image_tokens} per image" in text and f"{rec['parameters']:,}" in text


def test_info_without_weights_estimates_parameters_from_the_index(runner):
    rec = json.loads(runner.invoke(app, ["info", str(HUBMETA / "llava-hf__llava-1.5-7b-hf"), "--json"]).stdout)
    assert rec["family"] == "llava-1.5" and rec["image_tokens"] == 576 and rec["context_length"] == 4096
    assert rec["dtype"] == "float16" and not rec["weights_present"] and not rec["parameters_exact"]
    index = json.loads((HUBMETA / "llava-hf__llava-1.5-7b-hf" / "model.safetensors.index.json").read_text())
    assert rec["parameters"] == index["metadata"]["total_size"] // 2
    text = runner.invoke(app, ["info", str(HUBMETA / "llava-hf__llava-1.5-7b-hf")]).stdout
    assert "~7.06 B" in text and "(weights not downloaded)" in text


def test_info_of_a_cached_hub_id_offline(runner, hub_cache):
    r = run("info", "llava-hf/tiny-vip", "--json", cache=hub_cache)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["template"] == "vip-llava"
    r = run("info", "llava-hf/not-cached", cache=hub_cache)
    assert r.returncode == 1 and r.stderr.startswith("error: llava-hf/not-cached: not in the local cache")


def test_info_errors_are_one_line(runner, tmp_path):
    r = runner.invoke(app, ["info", str(tmp_path / "nope")])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "not found" in r.stderr
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    r = runner.invoke(app, ["info", str(tmp_path)])
    assert r.exit_code == 1 and "unsupported architecture" in r.stderr


def test_models_lists_the_llava_checkpoints_in_the_cache(runner, hub_cache, tiny):
    recs = json.loads(run("models", "--json", cache=hub_cache).stdout)
    assert [r["model"] for r in recs] == ["llava-hf/tiny-partial", "llava-hf/tiny-qwen", "llava-hf/tiny-vip"]
    by_id = {r["model"]: r for r in recs}
    assert by_id["llava-hf/tiny-qwen"]["family"] == "interleave-qwen" and by_id["llava-hf/tiny-vip"]["family"] == "vip-llava"
    qwen_size = sum(p.stat().st_size for p in tiny("qwen").folder.iterdir())
    assert by_id["llava-hf/tiny-qwen"]["size_on_disk"] == qwen_size and by_id["llava-hf/tiny-qwen"]["complete"]
    assert not by_id["llava-hf/tiny-partial"]["complete"]
    every = json.loads(run("models", "--all", "--json", cache=hub_cache).stdout)
    assert {"model": "google-bert/bert-base-uncased", "family": None}.items() <= every[0].items()
    text = run("models", cache=hub_cache).stdout.splitlines()
    assert len(text) == 3 and text[1].split()[0] == "llava-hf/tiny-qwen" and "interleave-qwen" in text[1]
    assert "incomplete" in text[0]


def test_models_with_no_cache(runner, tmp_path):
    r = run("models", cache=tmp_path / "none")
    assert r.returncode == 0 and r.stdout == "" and "no LLaVA-family checkpoints" in r.stderr
    assert run("models", "--json", cache=tmp_path / "none").stdout == "[]\n"
