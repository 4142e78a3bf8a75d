"""Strict loading: every wrong checkpoint names what is wrong; devices and dtypes resolve as documented."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llava_cli.config import LlavaConfig
from llava_cli.devices import cpu_has_bf16, resolve_device, resolve_dtype
from llava_cli.errors import LlavaError
from llava_cli.weights import load_model

EMBED = "language_model.model.embed_tokens.weight"


@pytest.fixture
def folder(tiny, tmp_path):
    """A writable copy of the tiny qwen checkpoint (legacy layout, one file)."""
    return shutil.copytree(tiny("qwen").folder, tmp_path / "ckpt")


def load(folder):
    return load_model(folder, LlavaConfig.from_file(folder / "config.json"), torch.float32, torch.device("cpu"))


def rewrite(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_the_copy_loads(folder):
    assert load(folder).cfg.model_type == "llava"


def test_a_missing_tensor_is_named(folder):
    rewrite(folder, lambda t: t.pop("multi_modal_projector.linear_2.bias"))
    with pytest.raises(LlavaError, match=r"missing 1 tensors: multi_modal_projector\.linear_2\.bias"):
        load(folder)


def test_an_unexpected_tensor_is_named(folder):
    rewrite(folder, lambda t: t.update({"multi_modal_projector.linear_3.weight": torch.zeros(2, 2)}))
    with pytest.raises(LlavaError, match=r"unexpected tensor 'multi_modal_projector\.linear_3\.weight'"):
        load(folder)


def test_a_wrong_shape_is_named_with_both_shapes(folder):
    def shrink(t):
        t[EMBED] = t[EMBED][:-1]

    rewrite(folder, shrink)
    with pytest.raises(LlavaError, match=rf"'{EMBED}' has shape \(447, 64\), the config implies \(448, 64\)"):
        load(folder)


def test_a_truncated_file_is_reported(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LlavaError, match="corrupt or truncated safetensors"):
        load(folder)


def test_pickled_weights_are_refused_with_a_pointer_to_convert(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(LlavaError, match="llava convert"):
        load(folder)


def test_a_shard_named_in_the_index_but_absent(folder):
    index = {"metadata": {}, "weight_map": {EMBED: "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LlavaError, match="missing weight shard model-00002-of-00002.safetensors"):
        load(folder)


def test_tied_output_head_shares_the_embedding(folder):
    model = load(folder)
    assert model.language_model.lm_head.weight.data_ptr() == model.language_model.model.embed_tokens.weight.data_ptr()


def test_auto_dtype_is_bfloat16_only_where_the_cpu_has_it():
    expected = torch.bfloat16 if cpu_has_bf16() else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(LlavaError, match="unknown dtype 'int3'"):
        resolve_dtype("int3", torch.device("cpu"))


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(LlavaError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(LlavaError, match="CUDA is not available"):
            resolve_device("cuda")
