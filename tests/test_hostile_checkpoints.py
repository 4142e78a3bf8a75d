"""Broken checkpoint folders given to `llava ask -m`: each is refused in one line that names the file or key and what
to do, before any answer; truncated or lying safetensors are caught before the file is memory-mapped past its end."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints import DATA
from llava_cli.cli import app

PHOTO = str(DATA / "chelsea.png")
WEIGHTS = "model.safetensors"
EMBED = "language_model.model.embed_tokens.weight"
PROJ = "multi_modal_projector.linear_2.bias"


@pytest.fixture
def ckpt(tiny, tmp_path) -> Path:
    """A copy of the tiny qwen checkpoint made of hard links: a case replaces a file (unlink, write), never edits it."""
    return Path(shutil.copytree(tiny("qwen").folder, tmp_path / "ckpt", copy_function=os.link))


def replace(path: Path, data: bytes | str) -> None:
    path.unlink(missing_ok=True)  # break the hard link first, so the session's checkpoint stays intact
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def edit_json(name: str, change):
    def apply(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        replace(folder / name, json.dumps(change(data) or data))
    return apply


def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def edit_header(change):
    def apply(folder: Path) -> None:
        header, data = split(folder / WEIGHTS)
        change(header)
        replace(folder / WEIGHTS, join(header, data))
    return apply


def edit_tensors(change):
    def apply(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / WEIGHTS)
        change(tensors)
        (folder / WEIGHTS).unlink()
        save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    return apply


def unlink(*names: str):
    def apply(folder: Path) -> None:
        for name in names:
            (folder / name).unlink()
    return apply


def truncate(fraction: float, inside_header: bool = False):
    def apply(folder: Path) -> None:
        raw = (folder / WEIGHTS).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        cut = 8 + int(n * fraction) if inside_header else 8 + n + int((len(raw) - 8 - n) * fraction)
        replace(folder / WEIGHTS, raw[:cut])
    return apply


def lie(header: dict) -> None:
    """The last tensor's offsets move past the end of the file, keeping its length consistent with its shape."""
    key = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [begin + 4096, end + 4096]


class Evil:
    """Unpickling this creates a file: the proof that a .bin was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def pickled(folder: Path) -> None:
    (folder / WEIGHTS).unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Evil(folder / "UNPICKLED")))


def index_naming(shard: str):
    def apply(folder: Path) -> None:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {EMBED: shard}}))
    return apply


def rename_image_token(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"):
        text = (folder / name).read_text()
        replace(folder / name, text.replace('"<image>"', '"<picture>"'))


def text_config(**values):
    return edit_json("config.json", lambda d: d["text_config"].update(values))


def vision_config(**values):
    return edit_json("config.json", lambda d: d["vision_config"].update(values))


# (case id, how to break the folder, what the one line must say)
CASES = [
    ("no-config", unlink("config.json"), ["config.json", "missing"]),
    ("no-tokenizer", unlink("tokenizer.json"), ["tokenizer.json", "missing"]),
    ("no-tokenizer-files", unlink("tokenizer.json", "tokenizer_config.json"), ["tokenizer.json", "tokenizer_config.json"]),
    ("no-weights", unlink(WEIGHTS), ["no weights", WEIGHTS]),
    ("truncated-data", truncate(0.5), [WEIGHTS, "truncated", "download"]),
    ("truncated-header", truncate(0.5, inside_header=True), [WEIGHTS, "truncated", "download"]),
    ("empty-weights", truncate(0.0, inside_header=True), [WEIGHTS, "truncated"]),
    ("header-lies", edit_header(lie), [WEIGHTS, "outside the file", "download"]),
    ("header-bad-dtype", edit_header(lambda h: h[EMBED].update(dtype="F7")), [WEIGHTS, EMBED]),
    ("header-not-json", lambda f: replace(f / WEIGHTS, b"\x10" + b"\0" * 7 + b"{not json}" + b"x" * 64),
     [WEIGHTS, "header is not JSON"]),
    ("wrong-shape", edit_tensors(lambda t: t.update({EMBED: t[EMBED][:-1]})), [EMBED, "(447, 64)", "config.json"]),
    ("missing-tensor", edit_tensors(lambda t: t.pop(PROJ)), [PROJ, "missing"]),
    ("extra-tensor", edit_tensors(lambda t: t.update({"multi_modal_projector.linear_3.weight": t[PROJ].clone()})),
     ["multi_modal_projector.linear_3.weight", "unexpected"]),
    ("model-type", edit_json("config.json", lambda d: d.update(model_type="llava_next")),
     ["config.json", "'llava_next'", "supported: llava, vipllava"]),
    ("text-model-type", text_config(model_type="mistral"), ["config.json", "'mistral'", "llama, qwen2"]),
    ("vision-model-type", vision_config(model_type="dinov2"), ["config.json", "'dinov2'", "clip_vision_model"]),
    ("config-not-json", lambda f: replace(f / "config.json", "{\"model_type\": llava"), ["config.json", "invalid JSON"]),
    ("config-not-object", lambda f: replace(f / "config.json", "[1, 2]"), ["config.json", "JSON object"]),
    ("config-not-utf8", lambda f: replace(f / "config.json", b"{\"model_type\": \"\xff\"}"), ["config.json"]),
    ("hidden-size-text", text_config(hidden_size="big"), ["config.json", "text_config.hidden_size", '"big"']),
    ("heads-zero", text_config(num_attention_heads=0), ["config.json", "text_config.num_attention_heads", "0"]),
    ("heads-float", text_config(num_attention_heads=2.5), ["config.json", "text_config.num_attention_heads"]),
    ("vocab-negative", text_config(vocab_size=-3), ["config.json", "text_config.vocab_size"]),
    ("eps-string", text_config(rms_norm_eps="tiny"), ["config.json", "text_config.rms_norm_eps"]),
    ("patch-list", vision_config(patch_size=[14]), ["config.json", "vision_config.patch_size"]),
    ("vision-act", vision_config(hidden_act="swish"), ["config.json", "vision_config.hidden_act", "'swish'"]),
    ("text-config-list", edit_json("config.json", lambda d: d.update(text_config=[1])), ["config.json", "text_config"]),
    ("image-token-string", edit_json("config.json", lambda d: d.update(image_token_index="<image>")),
     ["config.json", "image_token_index"]),
    ("feature-layer-string", edit_json("config.json", lambda d: d.update(vision_feature_layer="last")),
     ["config.json", "vision_feature_layer"]),
    ("tokenizer-not-json", lambda f: replace(f / "tokenizer.json", "{\"model\": "), ["tokenizer.json"]),
    ("tokenizer-config-list", lambda f: replace(f / "tokenizer_config.json", "[]"), ["tokenizer_config.json"]),
    ("processor-size-text", edit_json("preprocessor_config.json", lambda d: d.update(size="big")),
     ["preprocessor_config.json", "size"]),
    ("processor-mean-text", edit_json("preprocessor_config.json", lambda d: d.update(image_mean="grey")),
     ["preprocessor_config.json", "image_mean"]),
    ("generation-eos-text", edit_json("generation_config.json", lambda d: d.update(eos_token_id="end")),
     ["generation_config.json", "eos_token_id"]),
    ("chat-template-not-json", lambda f: replace(f / "chat_template.json", "{"), ["chat_template.json"]),
    ("no-image-token", rename_image_token, ["tokenizer.json", "<image>", "image_token_index"]),
    ("missing-shard", index_naming("model-00002-of-00002.safetensors"), ["model-00002-of-00002.safetensors", "index"]),
    ("shard-outside", index_naming("../../etc/passwd"), ["../../etc/passwd"]),
    ("index-not-json", lambda f: (f / "model.safetensors.index.json").write_text("{"), ["model.safetensors.index.json"]),
    ("pickle", pickled, ["pickle", "llava convert"]),
]


def ask(runner, model: str, *extra: str):
    return runner.invoke(app, ["ask", PHOTO, "What is this?", "-m", model, "-n", "2", "--dtype", "float32", *extra])


def assert_one_error(result, code: int = 1) -> str:
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout and "internal error" not in lines[0]
    return lines[0]


@pytest.mark.parametrize("case,breakage,says", CASES, ids=[c[0] for c in CASES])
def test_a_broken_checkpoint_is_one_line_and_no_answer(runner, ckpt, case, breakage, says):
    breakage(ckpt)
    line = assert_one_error(ask(runner, str(ckpt)))
    assert all(s in line for s in says), line
    assert not (ckpt / "UNPICKLED").exists()


def test_the_session_checkpoint_survived_the_cases(runner, tiny):
    r = ask(runner, str(tiny("qwen").folder))
    assert r.exit_code == 0 and r.stdout.strip(), r.stderr


@pytest.mark.parametrize("name,says", [
    (WEIGHTS, ["is a file", "folder"]),
    ("pytorch_model.bin", ["is a file", "llava convert"]),
])
def test_a_file_given_as_the_model(runner, ckpt, name, says):
    (ckpt / name).touch()
    line = assert_one_error(ask(runner, str(ckpt / name)))
    assert all(s in line for s in says), line


def test_chat_and_batch_refuse_a_truncated_checkpoint_the_same_way(runner, ckpt, tmp_path):
    truncate(0.5)(ckpt)
    r = runner.invoke(app, ["chat", "-m", str(ckpt), "--dtype", "float32"], input="Hello?\n")
    assert "truncated" in assert_one_error(r) and r.stdout == ""
    out = tmp_path / "out.jsonl"
    r = runner.invoke(app, ["batch", PHOTO, "-p", "What?", "-m", str(ckpt), "--dtype", "float32", "-o", str(out)])
    assert "truncated" in assert_one_error(r)
    assert not out.exists(), "a batch that never started left an output file"


def test_a_truncated_file_exits_1_in_a_real_process_not_sigbus(ckpt):
    truncate(0.9)(ckpt)
    p = subprocess.run([sys.executable, "-m", "llava_cli", "ask", "Hi", "-m", str(ckpt), "-n", "1"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 1, p.stderr  # a read past the mapping would be -7 (SIGBUS)
    assert p.stdout == "" and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1


def test_a_file_that_shrinks_after_its_header_was_read(ckpt, monkeypatch):
    from llava_cli import weights
    from llava_cli.errors import LlavaError

    header = weights.read_header(ckpt / WEIGHTS)
    truncate(0.5)(ckpt)  # as a download or copy still in progress would be
    monkeypatch.setattr(weights, "read_header", lambda path: header)
    with pytest.raises(LlavaError, match="shrank since its header was read"):
        list(weights.read_tensors([ckpt / WEIGHTS]))  # without the check: SIGBUS, and this test process dies


# ---------------------------------------------------------------------------------------------------- memory

def tiny_estimate(folder: Path, dtype, quantize=None) -> tuple[int, int]:
    import torch

    from llava_cli import memory
    from llava_cli.config import LlavaConfig
    from llava_cli.weights import entries, read_header

    cfg = LlavaConfig.from_file(folder / "config.json")
    return memory.estimate(cfg, entries(cfg, [read_header(folder / WEIGHTS)]), dtype, torch.device("cpu"), quantize)


def test_the_estimate_counts_the_weights_the_model_holds(tiny):
    import torch
    from safetensors import safe_open

    folder = tiny("qwen").folder
    with safe_open(folder / WEIGHTS, "pt") as f:  # float32; the tied head is not stored, post_layernorm is unused
        stored = sum(f.get_slice(k).get_shape()[0] * (math.prod(f.get_slice(k).get_shape()[1:])) * 4
                     for k in f.keys() if "post_layernorm" not in k)
    weights, kv = tiny_estimate(folder, torch.float32)
    assert weights == stored
    assert tiny_estimate(folder, torch.bfloat16) == (stored // 2, kv // 2)
    assert kv == 2 * 2 * 2 * 16 * 512 * 4  # k and v, 2 layers, 2 kv heads, head_dim 16, 512 positions, float32
    assert tiny_estimate(folder, torch.bfloat16, "int8")[0] < stored // 2


@pytest.mark.parametrize("family", ["qwen", "llava"])  # tied and untied output heads
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_quantized_estimate_is_what_the_quantized_model_holds(tiny, tmp_path, family, mode):
    """Quantized at load, and loaded from a checkpoint saved quantized (its tied head stored): the most the model
    holds, int4's packed copies included (built by the first batch; held() builds them)."""
    import shutil

    import torch

    from llava_cli import quant
    from llava_cli.pipeline import Llava

    def held(model) -> int:
        for m in quant.int4_layers(model):
            m.packed_weight()
        tensors = {t.data_ptr(): t.nbytes for t in [*model.parameters(), *model.buffers()]}  # a tied one counts once
        return sum(tensors.values()) - sum(p.nbytes for n, p in model.named_parameters() if "post_layernorm" in n)

    folder = tiny(family).folder
    model = Llava.load(folder, dtype="bfloat16", device="cpu", threads=1, quantize=mode).model
    assert tiny_estimate(folder, torch.bfloat16, mode)[0] == held(model)
    saved = shutil.copytree(folder, tmp_path / "q", ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    quant.save(model, saved / WEIGHTS)
    again = Llava.load(saved, dtype="bfloat16", device="cpu", threads=1).model
    assert tiny_estimate(saved, torch.bfloat16, mode)[0] == held(again) == held(model)


def test_the_available_memory_is_known_on_linux():
    import torch

    from llava_cli.memory import available

    free = available(torch.device("cpu"))
    assert free is None if not Path("/proc/meminfo").exists() else free > 0


def _cgroup(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


@pytest.mark.parametrize("layout", ["v2-own-group", "v2-root", "v1-own-group", "v1-root", "no-limit", "none"])
def test_a_container_s_memory_limit_counts(tmp_path, monkeypatch, layout):
    """A cgroup capping the process below the machine's MemAvailable is what the check compares against."""
    import torch

    from llava_cli import memory

    root, proc = tmp_path / "cgroup", tmp_path / "self-cgroup"
    proc.write_text("12:memory:/docker/abc\n0::/system.slice/job.scope\n")
    gib = 2**30
    v2 = {"memory.max": str(4 * gib), "memory.current": str(3 * gib), "memory.stat": f"anon 1\ninactive_file {gib}\n"}
    v1 = {"memory.limit_in_bytes": str(4 * gib), "memory.usage_in_bytes": str(3 * gib),
          "memory.stat": f"cache 5\ntotal_inactive_file {gib}\n"}
    folder = {"v2-own-group": root / "system.slice/job.scope", "v2-root": root,
              "v1-own-group": root / "memory/docker/abc", "v1-root": root / "memory", "no-limit": root / "memory",
              "none": tmp_path / "elsewhere"}[layout]
    files = v2 if layout.startswith("v2") else v1
    if layout == "no-limit":
        files = {**v1, "memory.limit_in_bytes": "9223372036854771712"}
    _cgroup(folder, files)
    expected = None if layout in ("no-limit", "none") else 2 * gib  # 4 GiB - (3 GiB used - 1 GiB reclaimable cache)
    assert memory.cgroup_free(root, proc) == expected
    monkeypatch.setattr(memory, "cgroup_free", lambda: None)
    machine = memory.available(torch.device("cpu"))  # MemAvailable, where known
    monkeypatch.setattr(memory, "cgroup_free", lambda: expected)
    free = memory.available(torch.device("cpu"))
    assert free == (machine if expected is None else expected if machine is None else min(machine, expected))


@pytest.fixture
def memory_of(monkeypatch):
    """Pretend the machine has `n` bytes available."""
    from llava_cli import memory

    def set_to(n: int) -> None:
        monkeypatch.setattr(memory, "available", lambda device: n)
    return set_to


def test_a_model_too_big_says_what_it_needs_and_what_would_fit(runner, qwen, memory_of):
    import torch

    from llava_cli.memory import gb, needed

    half = needed(*tiny_estimate(Path(qwen), torch.bfloat16))
    memory_of(half)
    line = assert_one_error(ask(runner, qwen))
    assert line.startswith("error: not enough memory: loading in float32 needs about ") and "is available" in line
    assert f"; --dtype bfloat16 needs {gb(half)}" in line and "LLAVA_NO_MEMORY_CHECK=1" in line


def test_when_nothing_fits_the_smallest_choice_is_named(runner, qwen, memory_of):
    memory_of(1000)
    line = assert_one_error(ask(runner, qwen))
    assert "not enough memory" in line and "even --dtype bfloat16 --quantize int" in line
    r = runner.invoke(app, ["chat", "-m", qwen, "--dtype", "bfloat16", "--quantize", "int8"], input="Hi\n")
    assert "not enough memory: loading in bfloat16 with --quantize int8" in assert_one_error(r)


def test_the_check_can_be_skipped(runner, qwen, memory_of, monkeypatch):
    memory_of(1000)
    monkeypatch.setenv("LLAVA_NO_MEMORY_CHECK", "1")
    r = ask(runner, qwen)
    assert r.exit_code == 0 and r.stdout.strip(), r.stderr
