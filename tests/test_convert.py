"""`llava convert`: original and hub-layout checkpoints in, verified hub-layout folders out.

The original-format sources are tiny random transformers models written back into the original formats
(tests/originals.py); their converted folders must give transformers' logits within 1e-5 in float32.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from checkpoints import DATA, HUBMETA, SHARED_HUBMETA, disk_key
from originals import LMMS_TAIL, SOURCES, build_original
from llava_cli import quant
from llava_cli.cli import app
from llava_cli.convert import parse_size
from llava_cli.convert_keys import (KNOWN_TOWERS, dropped_because, original_config, original_name, padded_vocab,
                                    tower_name)
from llava_cli.convert_tokenizer import load_tokenizer
from llava_cli.config import LlavaConfig
from llava_cli.decoder import Step
from llava_cli.image import preprocess
from llava_cli.pipeline import Llava
from llava_cli.templates import Message
from llava_cli.ui import human_bytes
from llava_cli.weights import read_header, read_tensors, weight_files

runner = CliRunner()
TEMPLATES = {"liuhaotian": "llava-1.5", "mucai": "vip-llava", "lmms-lab": "interleave-qwen"}


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """original(source, **options) -> Original, each built once per module."""
    root, cache = tmp_path_factory.mktemp("originals"), {}

    def get(source: str, **options):
        key = (source, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = build_original(source, root / f"{source}-{len(cache)}", **options)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def photo():
    from PIL import Image

    return Image.open(DATA / "chelsea.png").convert("RGB")


def convert(*args: str):
    result = runner.invoke(app, ["convert", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def ours_logits(folder: Path, photo, question="What is in the picture?", dtype="float32", quantize=None):
    llava = Llava.load(folder, dtype=dtype, device="cpu", quantize=quantize)
    ids = llava.prompt([Message("user", question, images=1)]).ids
    pixels = preprocess([photo], llava.image_config)
    model = llava.model
    with torch.inference_mode():
        model.setup_cache(1, len(ids))
        embeds = model.embed(torch.tensor([ids]), model.encode_images(pixels))
        logits = model(embeds, Step(0, torch.arange(len(ids))[None], None), last_only=False)[0]
    return llava, ids, pixels, logits


def ref_logits(model, ids, pixels):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0].float()


# ---------------------------------------------------------------------------------------------------- originals

@pytest.mark.parametrize("source", list(SOURCES))
def test_original_converts_to_transformers_logits(original, photo, tmp_path, source):
    o = original(source)
    code, stdout, stderr = convert(o.folder, tmp_path / "out", "--vision-tower", o.tower)
    assert code == 0, stderr
    llava, ids, pixels, ours = ours_logits(tmp_path / "out", photo)
    assert llava.template.name == TEMPLATES[source]  # the family's hub chat template, recognised
    assert ids.count(o.image_token_id) == llava.config.image_tokens
    torch.testing.assert_close(ours, ref_logits(o.reference, ids, pixels), rtol=0, atol=1e-5)
    # the report: every tensor re-read and identical, logits compared, every file hashed
    n = sum(1 for _ in read_tensors(weight_files(tmp_path / "out")))
    assert f"verification: {n}/{n} tensors identical to the source" in stdout
    assert "max |difference| 0 over" in stdout and ": ok" in stdout
    hashed = [line.split("  ")[1] for line in stdout.splitlines() if re.fullmatch(r"[0-9a-f]{64}  \S+", line)]
    assert sorted(hashed) == sorted(os.listdir(tmp_path / "out"))


@pytest.mark.parametrize("source", list(SOURCES))
def test_converted_folder_is_a_transformers_checkpoint(original, photo, tmp_path, source):
    """transformers reads the written config.json, tokenizer and weights as a llava-hf repo."""
    import transformers

    o = original(source)
    assert convert(o.folder, tmp_path / "out", "--vision-tower", o.tower, "--no-verify")[0] == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["text_config"]["vocab_size"] % 64 == 0 and cfg["image_token_index"] == o.image_token_id
    model = getattr(transformers, o.reference.__class__.__name__).from_pretrained(tmp_path / "out", dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")  # what a transformers user gets from the folder
    prompt = {"llava-1.5": "USER: <image>\nWhat is this? ASSISTANT:",
              "vip-llava": "###Human: <image>\nWhat?###Assistant:",
              "interleave-qwen": "<|im_start|>user\n<image>\nWhat?<|im_end|>\n<|im_start|>assistant\n",
              }[TEMPLATES[source]]
    ids = tok(prompt).input_ids
    llava = Llava.load(tmp_path / "out", weights=False)
    assert ids == llava.tokenizer.encode(prompt)
    from llava_cli.tokenizer import expand_image_tokens

    ids = expand_image_tokens(ids, o.image_token_id, llava.config.image_tokens)
    pixels = preprocess([photo], llava.image_config)
    torch.testing.assert_close(ref_logits(model.eval(), ids, pixels), ref_logits(o.reference, ids, pixels),
                               rtol=0, atol=1e-5)
    if source != "lmms-lab":
        assert tok.pad_token == "<pad>" and tok.convert_tokens_to_ids("<pad>") == cfg["pad_token_id"]


def test_tower_named_by_the_config_as_a_pickled_clip_model(original, photo, tmp_path):
    """No --vision-tower: mm_vision_tower names a CLIPModel folder (text model and projections dropped)."""
    o = original("liuhaotian", tower_as_clip_model=True)
    src = tmp_path / "src"
    shutil.copytree(o.folder, src)
    cfg = json.loads((src / "config.json").read_text()) | {"mm_vision_tower": str(o.tower)}
    (src / "config.json").write_text(json.dumps(cfg))
    code, stdout, stderr = convert(src, tmp_path / "out")
    assert code == 0, stderr
    assert "text_model.*" in stdout and "not part of the vision encoder" in stdout
    _, ids, pixels, ours = ours_logits(tmp_path / "out", photo)
    torch.testing.assert_close(ours, ref_logits(o.reference, ids, pixels), rtol=0, atol=1e-5)


def test_tokenizer_from_another_folder(original, tiny, photo, tmp_path):
    """--tokenizer with a hub-layout tokenizer that has <image> and <pad> already: nothing is added twice."""
    o = original("liuhaotian")
    code, stdout, stderr = convert(o.folder, tmp_path / "out", "--vision-tower", o.tower,
                                   "--tokenizer", tiny("llava").folder)
    assert code == 0, stderr
    assert "added <image>" not in stdout
    _, ids, pixels, ours = ours_logits(tmp_path / "out", photo)
    torch.testing.assert_close(ours, ref_logits(o.reference, ids, pixels), rtol=0, atol=1e-5)


def test_missing_tower_is_named(original, tmp_path):
    o = original("liuhaotian")
    src = tmp_path / "src"
    shutil.copytree(o.folder, src)
    cfg = json.loads((src / "config.json").read_text()) | {"mm_vision_tower": str(tmp_path / "no-such-tower")}
    (src / "config.json").write_text(json.dumps(cfg))
    code, _, stderr = convert(src, tmp_path / "out")
    assert code == 1 and "vision tower folder" in stderr and "not found" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- hub layout

@pytest.mark.parametrize("family", ["llava", "vipllava", "qwen"])
def test_hub_layout_relayout_and_reshard(tiny, photo, tmp_path, family):
    t = tiny(family, layout="v5")
    code, _, stderr = convert(t.folder, tmp_path / "out", "--max-shard-size", "40KB")
    assert code == 0, stderr
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all(f.stat().st_size < 40_000 or _tensors(f) == 1 for f in map(out.joinpath, shards))
    legacy = {disk_key(name, "legacy") for name in t.model.state_dict()}
    if family == "qwen":  # tied: the head is not stored
        legacy.discard("language_model.lm_head.weight")
    assert set(index["weight_map"]) == legacy
    _, ids, pixels, ours = ours_logits(out, photo)
    torch.testing.assert_close(ours, ref_logits(t.model, ids, pixels), rtol=0, atol=1e-5)
    for name in ("tokenizer.json", "chat_template.json", "preprocessor_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (t.folder / name).read_bytes()


def _tensors(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return len(list(f.keys()))


def test_dtype_change(tiny, tmp_path):
    t = tiny("llava")
    code, stdout, stderr = convert(t.folder, tmp_path / "out", "--dtype", "bfloat16")
    assert code == 0, stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f, \
            safe_open(str(t.folder / "model.safetensors"), framework="pt") as g:
        assert set(f.keys()) == set(g.keys())
        for key in f.keys():
            assert f.get_tensor(key).dtype == torch.bfloat16
            assert torch.equal(f.get_tensor(key), g.get_tensor(key).to(torch.bfloat16))
    assert "ok" in stdout
    code, _, stderr = convert(t.folder, tmp_path / "other", "--dtype", "int3")
    assert code == 1 and "unknown dtype 'int3'" in stderr and not (tmp_path / "other").exists()


# ---------------------------------------------------------------------------------------------------- --quantize

QWEIGHT = {"int8": torch.int8, "int4": torch.uint8}
LAYERS = {"int8": quant.Int8Linear, "int4": quant.Int4Linear}


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("source", list(SOURCES))
def test_quantized_conversion_is_what_quantizing_at_load_makes(original, photo, tmp_path, monkeypatch, source, mode):
    """DST holds, bit for bit, what `Llava.load(..., quantize=mode)` makes of the unquantized conversion; it loads
    without the flag and without quantizing anything, and gives the same logits exactly."""
    o = original(source)
    plain, out = tmp_path / "plain", tmp_path / "out"
    assert convert(o.folder, plain, "--vision-tower", o.tower, "--no-verify")[0] == 0
    code, stdout, stderr = convert(o.folder, out, "--vision-tower", o.tower, "--quantize", mode,
                                   "--max-shard-size", "100KB")
    assert code == 0, stderr
    files = weight_files(out)
    tensors = {key: t for key, _, t in read_tensors(files)}
    assert len(files) > 1 and all(read_header(f)[1][quant.METADATA_KEY] == mode for f in files)
    n = len(tensors)
    assert f"verification: {n}/{n} tensors identical to the source (quantized as {mode})" in stdout
    assert f"against the source quantized as {mode} at load: max |difference| 0 over" in stdout and ": ok" in stdout

    with monkeypatch.context() as patched:  # loading quantizes nothing: every layer's tensors come from the files
        patched.setattr(LAYERS[mode], "encode", lambda *_: pytest.fail("DST was quantized again at load"))
        llava, ids, _, ours = ours_logits(out, photo)
    float_model, _, _, float_logits = ours_logits(plain, photo)
    layers = {name: m for name, m in llava.model.named_modules() if isinstance(m, quant.Quantized)}
    decoder = {f"language_model.model.{name}" for name, m in
               float_model.model.language_model.model.layers.named_modules(prefix="layers")
               if isinstance(m, torch.nn.Linear)}
    head = "language_model.lm_head"
    assert layers.keys() - {head} == decoder and all(isinstance(m, LAYERS[mode]) for m in layers.values())

    # `llava info` names the quantization and counts weights, not packed bytes or scales (a tied head is quantized
    # and stored as its own copy, so it counts again)
    plain_info, out_info = (json.loads(CliRunner().invoke(app, ["info", str(f), "--json"]).stdout) for f in (plain, out))
    assert (plain_info["quantized"], out_info["quantized"]) == (None, mode)
    head_copy = layers[head].out_features * layers[head].in_features if head in layers and float_model.model.language_model.tie else 0
    assert out_info["parameters"] == plain_info["parameters"] + head_copy
    assert head in layers  # a tied head too, as its own copy
    for name in layers:
        assert tensors[f"{name}.qweight"].dtype == QWEIGHT[mode] and f"{name}.weight" not in tensors

    at_load, ids_at_load, _, expected = ours_logits(plain, photo, quantize=mode)
    assert ids == ids_at_load
    state = llava.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in at_load.model.state_dict().items())
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    assert not torch.equal(ours, float_logits)  # the quantized layers are the ones computing
    size = sum(f.stat().st_size for f in files)
    assert size < 0.8 * sum(f.stat().st_size for f in weight_files(plain))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_bfloat16_conversion_keeps_its_scales_as_the_loader_makes_them(tiny, photo, tmp_path, mode):
    """Scales are rounded to the output dtype when written, as at load in that dtype: the bfloat16 result equals
    quantizing the bfloat16 conversion at load, and the probe in float32 still finds no difference."""
    t = tiny("qwen")
    assert convert(t.folder, tmp_path / "plain", "--dtype", "bfloat16", "--no-verify")[0] == 0
    code, stdout, stderr = convert(t.folder, tmp_path / "out", "--dtype", "bfloat16", "--quantize", mode)
    assert code == 0, stderr
    assert "max |difference| 0 over" in stdout and "(float32; tolerance" in stdout
    scales = {k: v for k, _, v in read_tensors(weight_files(tmp_path / "out")) if k.endswith(("scales", "zeros"))}
    assert scales and all(v.dtype == torch.bfloat16 for v in scales.values())
    ours = ours_logits(tmp_path / "out", photo, dtype="bfloat16")[3]
    torch.testing.assert_close(ours, ours_logits(tmp_path / "plain", photo, dtype="bfloat16", quantize=mode)[3],
                               rtol=0, atol=0)


@pytest.mark.parametrize("mode,message", [
    ("nf4", "--quantize nf4 cannot be saved: bitsandbytes makes it on CUDA at load"),
    ("int3", "unknown quantization 'int3' (use int8 or int4)"),
])
@pytest.mark.parametrize("dry_run", [False, True])
def test_quantizations_convert_cannot_write_are_refused(tiny, tmp_path, mode, message, dry_run):
    code, stdout, stderr = convert(tiny("llava").folder, tmp_path / "out", "--quantize", mode,
                                   *(["--dry-run"] if dry_run else []))
    assert code == 1 and message in stderr and len(stderr.strip().splitlines()) == 1
    assert stdout == "" and list(tmp_path.iterdir()) == []


def test_a_quantized_source_is_refused(tiny, tmp_path):
    assert convert(tiny("llava").folder, tmp_path / "q", "--quantize", "int8", "--no-verify")[0] == 0
    code, _, stderr = convert(tmp_path / "q", tmp_path / "again", "--quantize", "int4")
    assert code == 1 and "is already quantized (int8); convert reads unquantized checkpoints" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "again").exists()


def test_dry_run_shows_the_quantization(original, tmp_path):
    o = original("lmms-lab")  # tied head: int4 writes it as a quantized copy of the embedding
    code, stdout, stderr = convert(o.folder, tmp_path / "dry", "--vision-tower", o.tower, "--quantize", "int4",
                                   "--dry-run")
    assert code == 0, stderr
    tc = o.reference.config.text_config
    h, i, vocab, layers = tc.hidden_size, tc.intermediate_size, tc.vocab_size, tc.num_hidden_layers
    group = quant.Int4Linear.group_for(i, h)
    assert f"quantized: int4, {7 * layers + 1} linear layers of the language model" in stdout
    assert "the tied output head as an int4 copy of the embedding" in stdout
    assert (f"model.layers.0.mlp.down_proj.weight -> language_model.model.layers.0.mlp.down_proj.qweight "
            f"[{h}, {i // 2}] uint8, .scales_zeros [{i // group}, {h}, 2] float32") in stdout
    assert (f"model.embed_tokens.weight -> language_model.model.embed_tokens.weight [{vocab}, {h}] float32, "
            f"language_model.lm_head.qweight [{vocab}, {h // 2}] uint8, .scales_zeros") in stdout
    assert "model.layers.0.input_layernorm.weight -> language_model.model.layers.0.input_layernorm.weight" in stdout
    assert not (tmp_path / "dry").exists()
    # what the dry run announces is what a conversion writes
    assert convert(o.folder, tmp_path / "out", "--vision-tower", o.tower, "--quantize", "int4", "--no-verify")[0] == 0
    written = {key: t for key, _, t in read_tensors(weight_files(tmp_path / "out"))}
    size = sum(t.numel() * t.element_size() for t in written.values())
    assert f"model.safetensors ({len(written)} tensors, {human_bytes(size)})" in stdout
    assert f"tensors: {len(written)} written" in stdout


def test_verification_compares_the_quantized_tensors(tiny, tmp_path, monkeypatch):
    import llava_cli.convert_write as writer

    real_save = writer.save_file
    scales = "language_model.model.layers.0.self_attn.q_proj.scales"

    def corrupt(tensors, path, metadata=None):
        tensors[scales] = tensors[scales] * 1.001
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(writer, "save_file", corrupt)
    code, stdout, stderr = convert(tiny("llava").folder, tmp_path / "out", "--quantize", "int8")
    assert code == 1 and "verification failed" in stderr
    assert f"differ: {scales}" in stdout and "FAILED" in stdout
    assert not (tmp_path / "out").exists() and (tmp_path / "out.unverified").exists()


# ---------------------------------------------------------------------------------------------------- safety

class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("payload", ["code", "int"])
def test_pickle_with_a_non_tensor_payload_is_refused(original, tmp_path, payload):
    o = original("liuhaotian")
    src = tmp_path / "src"
    shutil.copytree(o.folder, src)
    shard = src / "pytorch_model-00002-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    marker = tmp_path / "unpickled-code-ran"
    state["model.norm.extra"] = _Payload(str(marker)) if payload == "code" else 3
    torch.save(state, shard)
    code, _, stderr = convert(src, tmp_path / "out", "--vision-tower", o.tower)
    assert code == 1 and "refused" in stderr and shard.name in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_other_pickle_formats_are_refused(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"mm_vision_tower": "x", "model_type": "llava"}))
    torch.save({"w": torch.zeros(1)}, tmp_path / "src" / "model.ckpt")
    code, _, stderr = convert(tmp_path / "src", tmp_path / "out")
    assert code == 1 and "unsupported weight files (model.ckpt)" in stderr


def test_interrupted_conversion_leaves_no_destination(tiny, tmp_path, monkeypatch):
    import llava_cli.convert_write as writer

    written = []

    def save_then_fail(tensors, path, metadata=None):
        if written:
            raise KeyboardInterrupt  # Ctrl-C while the second shard is written
        written.append(path)
        real_save(tensors, path, metadata=metadata)

    real_save = writer.save_file
    monkeypatch.setattr(writer, "save_file", save_then_fail)
    code, _, stderr = convert(tiny("llava").folder, tmp_path / "out", "--max-shard-size", "100KB")
    assert code == 130 and "interrupted" in stderr
    assert len(written) == 1 and list(tmp_path.iterdir()) == []  # no DST, and no partial folder either


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_conversion_leaves_no_destination(tiny, tmp_path, sig):
    """A real process killed while it writes: SIGTERM cleans up, even SIGKILL leaves no DST."""
    ready = tmp_path / "first-shard-written"
    script = f"""
import sys, time
import llava_cli.convert_write as writer
real = writer.save_file
def slow(tensors, path, metadata=None):
    real(tensors, path, metadata=metadata)
    open({str(ready)!r}, "w").close()
    time.sleep(60)
writer.save_file = slow
from llava_cli.cli import main
sys.argv = ["llava", "convert", {str(tiny("llava").folder)!r}, {str(tmp_path / "out")!r}, "--max-shard-size", "100KB"]
main()
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(600):
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert ready.exists(), proc.communicate()[1].decode()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert not (tmp_path / "out").exists()
    if sig == signal.SIGTERM:
        assert proc.returncode == 130 and b"interrupted" in err
        assert [p.name for p in tmp_path.iterdir()] == [ready.name]


def test_dry_run_writes_nothing(original, tmp_path):
    o = original("mucai")
    dst = tmp_path / "new" / "out"
    code, stdout, stderr = convert(o.folder, dst, "--vision-tower", o.tower, "--dry-run")
    assert code == 0, stderr
    assert "model.mm_projector.clip_layernorm.weight -> multi_modal_projector.projector_layernorm.weight" in stdout
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight -> " \
           "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight" in stdout
    assert "model.layers.*.self_attn.rotary_emb.inv_freq (x2)" in stdout
    assert "tokenizer.json" in stdout and "model.safetensors (" in stdout
    assert not (tmp_path / "new").exists()


def test_existing_destination(tiny, tmp_path):
    src = tiny("llava").folder
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "config.json").write_text("{}")
    code, _, stderr = convert(src, dst)
    assert code == 1 and "pass --force" in stderr
    assert [p.name for p in dst.iterdir()] == ["config.json"]
    assert convert(src, dst, "--force", "--no-verify")[0] == 0
    assert Llava.load(dst, weights=False).config.text.vocab_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old folder is gone, nothing else left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    code, _, stderr = convert(src, other, "--force")
    assert code == 1 and "not a checkpoint folder" in stderr and (other / "todo.txt").exists()
    code, _, stderr = convert(src, src, "--force")
    assert code == 1 and "holds the source" in stderr


def test_failed_verification_keeps_the_result_aside(tiny, tmp_path, monkeypatch):
    import llava_cli.convert_write as writer

    real_save = writer.save_file

    def corrupt(tensors, path, metadata=None):
        tensors["multi_modal_projector.linear_1.weight"] = tensors["multi_modal_projector.linear_1.weight"] + 1
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(writer, "save_file", corrupt)
    code, stdout, stderr = convert(tiny("llava").folder, tmp_path / "out")
    assert code == 1 and "verification failed" in stderr
    assert "differ: multi_modal_projector.linear_1.weight" in stdout and "FAILED" in stdout
    assert not (tmp_path / "out").exists() and (tmp_path / "out.unverified" / "config.json").exists()


def test_corrupt_sentencepiece_model(original, tmp_path):
    o = original("liuhaotian")
    src = tmp_path / "src"
    shutil.copytree(o.folder, src)
    (src / "tokenizer.model").write_bytes(b"\x0a\xff\xff\xff")
    code, _, stderr = convert(src, tmp_path / "out", "--vision-tower", o.tower)
    assert code == 1 and "not a SentencePiece model" in stderr


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("500mb") == 5 * 10**8
    assert parse_size("1000") == 1000
    for bad in ("", "five", "-1GB", "0"):
        with pytest.raises(Exception, match="invalid size"):
            parse_size(bad)


# ---------------------------------------------------------------------------------------------------- real metadata

def _keys(folder: str, name: str) -> set[str]:
    return set((HUBMETA / folder / name).read_text().split())


@pytest.mark.parametrize("original_folder,hub_folder", [
    ("mucai__vip-llava-7b", "llava-hf__vip-llava-7b-hf"),
    ("lmms-lab__llava-next-interleave-qwen-0.5b", "llava-hf__llava-interleave-qwen-0.5b-hf"),
    ("lmms-lab__llava-next-interleave-qwen-7b", "llava-hf__llava-interleave-qwen-7b-hf"),
])
def test_real_original_keys_map_onto_the_llava_hf_keys(original_folder, hub_folder):
    keys = _keys(original_folder, "weight_keys.original.DERIVED.txt")
    mapped = {original_name(k) for k in keys if not dropped_because(k)}
    assert {k for k in keys if dropped_because(k)} == ({"model.image_newline"} if "lmms" in original_folder else set())
    assert mapped == _keys(hub_folder, "weight_keys.legacy_hub.txt")


def test_real_liuhaotian_keys_and_clip_tower_map_onto_llava_1_5_hf():
    index = json.loads((HUBMETA / "liuhaotian__llava-v1.5-7b" / "pytorch_model.bin.index.json").read_text())
    hub = _keys("llava-hf__llava-1.5-7b-hf", "weight_keys.legacy_hub.txt")
    clip = {k.removeprefix("vision_tower.") for k in hub if k.startswith("vision_tower.")}  # openai's vision_model.*
    mapped = {original_name(k) for k in index["weight_map"] if not dropped_because(k)} | {tower_name(k) for k in clip}
    assert mapped == hub


@pytest.mark.parametrize("original_config_file,hub_folder,tower,rows,stored_layers,tied", [
    ("liuhaotian__llava-v1.5-7b/config.json", "llava-hf__llava-1.5-7b-hf", None, 32000, 24, False),
    ("mucai__vip-llava-13b/config.json", "llava-hf__vip-llava-13b-hf", None, 32000, 24, False),
    ("lmms-lab__llava-next-interleave-qwen-0.5b/config.PARTIAL_EXCERPT.txt", "llava-hf__llava-interleave-qwen-0.5b-hf",
     None, 151936, 26, True),
])
def test_real_original_configs_resolve_as_llava_hf_did(original_config_file, hub_folder, tower, rows, stored_layers,
                                                        tied):
    text = (HUBMETA / original_config_file).read_text()
    if text.startswith("#"):  # the lmms-lab excerpt: JSON up to rope_theta, completed as originals.py does
        raw = json.loads(text[text.index("{"):text.index('  "rope_theta"')].rstrip().rstrip(",") + "}") | LMMS_TAIL
    else:
        raw = json.loads(text)
    qwen = raw["model_type"] == "llava_qwen"
    ours = original_config(raw, KNOWN_TOWERS[raw["mm_vision_tower"]], vip="mucai" in original_config_file,
                            stored_layers=stored_layers, vocab=padded_vocab(rows), image_id=151646 if qwen else 32000,
                            pad_id=None if qwen else 32001, tied=tied, dtype="float16")
    hub = json.loads((HUBMETA / hub_folder / "config.json").read_text())
    assert LlavaConfig.from_dict(ours) == LlavaConfig.from_dict(hub)


@pytest.mark.skipif(not (SHARED_HUBMETA / "llava-hf__llava-1.5-7b-hf" / "tokenizer.model").exists(),
                    reason="the real tokenizer files are in ../shared/hubmeta only")
def test_sentencepiece_model_converts_to_llava_hf_tokenizer_json(tmp_path):
    """liuhaotian's tokenizer.model + tokenizer_config.json -> exactly llava-1.5-7b-hf's tokenizer.json."""
    shutil.copy(SHARED_HUBMETA / "llava-hf__llava-1.5-7b-hf" / "tokenizer.model", tmp_path)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(HUBMETA / "liuhaotian__llava-v1.5-7b" / name, tmp_path)
    tok = load_tokenizer(tmp_path, add_llava_tokens=True)
    real = json.loads((SHARED_HUBMETA / "llava-hf__llava-1.5-7b-hf" / "tokenizer.json").read_text())
    assert json.loads(tok.files()["tokenizer.json"]) == real
    assert tok.added == {"<image>": 32000, "<pad>": 32001}
    hub_config = json.loads((HUBMETA / "llava-hf__llava-1.5-7b-hf" / "tokenizer_config.json").read_text())
    for key in ("added_tokens_decoder", "bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token", "legacy"):
        assert tok.config[key] == hub_config[key], key


def test_hub_ids_through_the_cache_offline(original, photo, tmp_path):
    """SRC and --vision-tower as hub ids, found in a huggingface_hub cache with the network off."""
    o = original("liuhaotian")
    cache = tmp_path / "hub"
    for repo, folder in (("liuhaotian/llava-v1.5-tiny", o.folder), ("openai/clip-tiny", o.tower)):
        root = cache / ("models--" + repo.replace("/", "--"))
        shutil.copytree(folder, root / "snapshots" / ("0" * 40))
        (root / "refs").mkdir()
        (root / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "llava_cli", "convert", *args], capture_output=True, text=True,
                              env=env, timeout=300)

    p = run("liuhaotian/llava-v1.5-tiny", str(tmp_path / "out"), "--vision-tower", "openai/clip-tiny")
    assert p.returncode == 0, p.stderr
    _, ids, pixels, ours = ours_logits(tmp_path / "out", photo)
    torch.testing.assert_close(ours, ref_logits(o.reference, ids, pixels), rtol=0, atol=1e-5)
    p = run("liuhaotian/llava-v1.5-tiny", str(tmp_path / "other"), "--vision-tower", "openai/not-cached")
    assert p.returncode == 1 and "openai/not-cached: not in the local cache" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "other").exists()
