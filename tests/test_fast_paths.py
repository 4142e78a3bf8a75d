"""Each fast path against the plain one on tiny checkpoints: bfloat16 decode through torch.mv, the compiled decode
step, the memory-mapped reader, int8 / int4 weight-only quantization (in memory and saved), and the thread count.

Tolerances, and why:
- torch.mv vs F.linear in bfloat16: both accumulate in float32 and round the output to bfloat16, so outputs differ
  by a few bfloat16 ulps: within 1% of the largest |output| per layer, 3% of the largest |logit| after the model.
- int8 (per-channel) and int4 (groups of 32-128): each weight is off by at most half a quantization step (checked
  exactly); the quantized model equals a bfloat16 model holding the dequantized weights within 3% of max |logit|;
  against plain bfloat16, teacher-forced top-1 agreement >= 90% and logit cosine >= 0.99 for int8. int4 on these
  64-wide random layers only reaches ~0.5-0.6 agreement (cosine 0.64-0.85), so its bound there is loose (0.4, 0.5).
- The packed kernels against dequantize-then-matmul: the same weights, so bfloat16 rounding only (2%).
"""

import shutil
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from llava_cli import decoder, devices, kernels, quant, vision
from llava_cli.config import LlavaConfig
from llava_cli.decoder import Linear, Step
from llava_cli.errors import LlavaError
from llava_cli.generate import generate
from llava_cli.pipeline import Llava
from llava_cli.quant_layers import KERNEL_ROWS
from llava_cli.templates import Message
from llava_cli.weights import load_model, read_tensors

STEPS = 16


def prompt_ids(llava: Llava) -> list[int]:
    return llava.prompt([Message("user", "What is shown in this image?", images=0)]).ids


def forced_logits(model, ids: list[int], tokens: list[int]) -> torch.Tensor:
    """(1 + len(tokens), V) float32 logits: after the prompt, then after each of `tokens` fed one at a time."""
    with torch.inference_mode():
        model.setup_cache(1, len(ids) + len(tokens))
        out = [model(model.embed(torch.tensor([ids]), None), Step(0, torch.arange(len(ids))[None], None))[0, -1]]
        for i, tok in enumerate(tokens):
            pos = torch.tensor([[len(ids) + i]])
            out.append(model(model.language_model.model.embed_tokens(torch.tensor([[tok]])),
                             Step(len(ids) + i, pos, None))[0, -1])
    return torch.stack(out)


def greedy(model, ids: list[int], n: int = STEPS) -> list[int]:
    return [int(t) for t in generate(model, [ids], None, max_new_tokens=n)]


# ------------------------------------------------------------------------------------------------ bfloat16 decode

@pytest.mark.parametrize("bias", [False, True])
def test_one_row_linear_uses_mv_and_matches_f_linear(bias):
    torch.manual_seed(0)
    lin = Linear(256, 96, bias=bias).to(torch.bfloat16)
    x = torch.randn(1, 1, 256, dtype=torch.bfloat16)
    ref = F.linear(x.float(), lin.weight.float(), None if lin.bias is None else lin.bias.float())
    fast = lin(x)
    assert fast.shape == (1, 1, 96) and fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), ref, rtol=0, atol=0.01 * ref.abs().max().item())
    many = torch.randn(3, 5, 256, dtype=torch.bfloat16)  # several rows: the plain F.linear path
    torch.testing.assert_close(lin(many), F.linear(many, lin.weight, lin.bias), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1024), (2, 37, 896), (1, 744, 64)])
def test_norm_and_rope_equal_the_reference_formulas_bit_for_bit(dtype, shape):
    """RMSNorm through F.rms_norm and RoPE through a roll: the same bits as transformers' formulas, fewer operations."""
    torch.manual_seed(0)
    x = (torch.randn(*shape) * 3).to(dtype)
    norm = decoder.RMSNorm(shape[-1], 1e-6).to(dtype)
    norm.weight.data = torch.randn(shape[-1]).to(dtype)
    xf = x.float()
    reference = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    assert torch.equal(norm(x), reference)

    heads, d = 4, shape[-1] // 16
    q = torch.randn(shape[0], heads, shape[1], d).to(dtype)
    positions = torch.arange(shape[1]).expand(shape[0], -1) + 5
    cos, signed_sin = decoder.rope(positions, d, 1e6, dtype)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    emb = torch.cat([positions.float()[..., None] * inv_freq] * 2, dim=-1)[:, None]
    rotate_half = torch.cat([-q[..., d // 2:], q[..., : d // 2]], dim=-1)
    assert torch.equal(decoder.apply_rope(q, cos, signed_sin), q * emb.cos().to(dtype) + rotate_half * emb.sin().to(dtype))


def test_a_row_sliced_from_a_long_sequence_gives_the_same_output():
    torch.manual_seed(0)
    lin = Linear(64, 512, bias=False).to(torch.bfloat16)
    h = torch.randn(1, 40, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(lin(h[:, -1:]), lin(h[:, -1:].clone()), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["qwen", "llava"])
def test_bfloat16_decode_matches_the_plain_path(tiny, family, monkeypatch):
    llava = Llava.load(tiny(family).folder, dtype="bfloat16", device="cpu", threads=1)
    ids = prompt_ids(llava)
    fast_tokens = greedy(llava.model, ids)
    fast = forced_logits(llava.model, ids, fast_tokens)
    monkeypatch.setattr(decoder, "LOW_PRECISION", ())  # every Linear takes F.linear
    plain_tokens = greedy(llava.model, ids)
    plain = forced_logits(llava.model, ids, fast_tokens)
    assert len(set(fast_tokens)) > 1, "a degenerate random model proves little"
    torch.testing.assert_close(fast, plain, rtol=0, atol=0.03 * plain.abs().max().item())
    assert fast_tokens == plain_tokens


def test_compiled_decode_step_matches_eager(tiny):
    """torch.compile fuses and reorders float32 arithmetic: logits within 1e-4, the same greedy tokens."""
    llava = Llava.load(tiny("qwen").folder, dtype="float32", device="cpu", threads=1)
    ids = prompt_ids(llava)
    eager_tokens = greedy(llava.model, ids)
    eager = forced_logits(llava.model, ids, eager_tokens)
    llava.model.compile_decode()
    assert greedy(llava.model, ids) == eager_tokens
    torch.testing.assert_close(forced_logits(llava.model, ids, eager_tokens), eager, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------ vision MLP

@pytest.mark.parametrize("bias", [False, True])
def test_many_row_bfloat16_linear_through_onednn_gives_f_linear_s_bits(bias):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN")
    g = torch.Generator().manual_seed(0)
    lin = Linear(96, 200, bias=bias).to(torch.bfloat16)
    x = torch.randn(2, 37, 96, generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        assert decoder.onednn_linear(x.reshape(-1, 96), lin.weight, lin.bias) is not None
        assert lin(x).equal(F.linear(x, lin.weight, lin.bias))
        assert decoder.onednn_linear(x.reshape(-1, 96).float(), lin.weight.float(), None) is None
        assert decoder.onednn_linear(x, lin.weight, lin.bias) is None  # 3D: the caller flattens first


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
def test_fused_linear_gelu_rounds_once_where_torch_rounds_twice(act):
    """oneDNN applies the GELU to the float32 sums: within one bfloat16 rounding of the float32 result, where
    torch's two operations are within two."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN")
    g = torch.Generator().manual_seed(0)
    lin = Linear(96, 200).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(200, 96, generator=g) * 0.2)
        lin.bias.copy_(torch.randn(200, generator=g))
    x = torch.randn(3, 37, 96, generator=g).to(torch.bfloat16)
    approximate = "tanh" if act.endswith("tanh") else "none"
    with torch.inference_mode():
        y = vision.linear_gelu(lin, x, act)
        ref = F.gelu(x.float() @ lin.weight.float().T + lin.bias.float(), approximate=approximate)
        two = F.gelu(lin(x), approximate=approximate)
    assert y is not None and y.shape == (3, 37, 200) and y.dtype == torch.bfloat16
    # one rounding (2^-8 of |y|) plus the float32 summation order (2^-16 of the sum of |terms|)
    tol = 2**-8 * ref.abs() + 2**-16 * (x.float().abs() @ lin.weight.float().abs().T + lin.bias.float().abs())
    assert ((y.float() - ref).abs() <= tol).all()
    assert (y.float() - ref).abs().max() <= (two.float() - ref).abs().max()
    assert vision.linear_gelu(lin, x, "quick_gelu") is None  # CLIP's: torch's operations
    assert vision.linear_gelu(lin.float(), x.float(), act) is None


# ------------------------------------------------------------------------------------------------ memory-mapped reader

def test_reader_gives_the_same_tensors_as_safetensors(tiny):
    folder = tiny("qwen", dtype=torch.bfloat16).folder
    ref = load_file(folder / "model.safetensors")
    got = {k: t.clone() for k, _, t in read_tensors([folder / "model.safetensors"])}
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k


def test_float32_load_of_a_bfloat16_file_is_the_exact_cast(tiny):
    folder = tiny("qwen", dtype=torch.bfloat16).folder
    model = load_model(folder, LlavaConfig.from_file(folder / "config.json"), torch.float32, torch.device("cpu"))
    ref = load_file(folder / "model.safetensors")
    got = model.state_dict()
    assert len(got.keys() & ref.keys()) > 20  # (the file also holds tensors LLaVA never reads, e.g. post_layernorm)
    for k in got.keys() & ref.keys():
        v = ref[k]
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v.float()), k


def test_a_header_longer_than_the_file_is_reported(tiny, tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(LlavaError, match="corrupt or truncated safetensors file"):
        list(read_tensors([bad]))


# ------------------------------------------------------------------------------------------------ quantization

@pytest.mark.parametrize("cls,out", [(quant.Int8Linear, 96), (quant.Int4Linear, 96), (quant.Int4Linear, 4096 + 64)])
def test_quantized_linear_kernel_matches_dequantize_and_error_is_half_a_step(cls, out):
    """(4096 + 64 outputs: int4 packs 4096 rows at a time, and the chunks must join into the kernel's layout.)"""
    torch.manual_seed(0)
    w = torch.randn(out, 256) * 0.05
    args = (256, out, False, torch.bfloat16) + ((128,) if cls is quant.Int4Linear else ())
    m = cls(*args)
    for k, v in m.encode(w).items():
        setattr(m, k, v)
    if isinstance(m, quant.Int4Linear):
        m.finish()
        step = m.scales_zeros[..., 0].float().t().repeat_interleave(128, dim=1)  # (out, in)
    else:
        step = m.scales.float()[:, None]
    deq = m.dequantize(torch.float32)
    assert ((deq - w).abs() <= step * 0.51).all()  # half a step (0.01: float32 rounding of the dequantization)
    for rows in (1, 4, KERNEL_ROWS + 8):  # kernel below KERNEL_ROWS, dequantize + matmul above
        x = torch.randn(rows, 2, 256, dtype=torch.bfloat16)[:, 0]  # a strided slice, as h[:, -1:] of a batch is
        ref = x.float() @ deq.t()
        torch.testing.assert_close(m(x).float(), ref, rtol=0, atol=0.02 * ref.abs().max().item())
        # the same rows as one sequence's positions (1, T, in): int4 takes them a row at a time before its copy
        torch.testing.assert_close(m(x[None])[0].float(), ref, rtol=0, atol=0.02 * ref.abs().max().item())


@pytest.mark.parametrize("family", ["qwen", "llava"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_equals_bfloat16_with_its_dequantized_weights(tiny, family, mode):
    """Kernels, streaming quantization at load and the (tied) head, apart from the quantization error itself."""
    folder = tiny(family).folder
    q = Llava.load(folder, dtype="bfloat16", device="cpu", threads=1, quantize=mode)
    ref = Llava.load(folder, dtype="bfloat16", device="cpu", threads=1)
    swapped = {n: m for n, m in q.model.named_modules() if isinstance(m, quant.Quantized)}
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in ref.model.language_model.model.layers.modules())
    assert len(swapped) == n_linear + 1  # every decoder linear, and the head (tied or not)
    for name, m in swapped.items():
        ref.model.get_submodule(name).weight = torch.nn.Parameter(m.dequantize(torch.bfloat16), requires_grad=False)
    ids = prompt_ids(q)
    tokens = greedy(q.model, ids)
    want, got = forced_logits(ref.model, ids, tokens), forced_logits(q.model, ids, tokens)
    torch.testing.assert_close(got, want, rtol=0, atol=0.03 * want.abs().max().item())


@pytest.mark.parametrize("family", ["qwen", "llava"])
@pytest.mark.parametrize("mode,agree,cosine", [("int8", 0.9, 0.99), ("int4", 0.4, 0.5)])
def test_quantized_model_agrees_with_bfloat16(tiny, family, mode, agree, cosine):
    """The quantization error on a whole model; int4 on 64-wide random layers is far noisier than on real ones."""
    folder = tiny(family).folder
    plain = Llava.load(folder, dtype="bfloat16", device="cpu", threads=1)
    q = Llava.load(folder, dtype="bfloat16", device="cpu", threads=1, quantize=mode)
    ids = prompt_ids(plain)
    tokens = greedy(plain.model, ids)
    ref, got = forced_logits(plain.model, ids, tokens), forced_logits(q.model, ids, tokens)
    match = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    assert match >= agree, f"{mode}: top-1 agreement {match:.2f}"
    assert F.cosine_similarity(ref, got, dim=-1).min() > cosine


@pytest.mark.parametrize("family", ["qwen", "llava"])  # tied and untied output heads
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_saved_quantized_checkpoint_loads_as_it_was(tiny, tmp_path, family, mode):
    src = tiny(family).folder
    q = Llava.load(src, dtype="bfloat16", device="cpu", threads=1, quantize=mode)
    dest = shutil.copytree(src, tmp_path / "q", ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    quant.save(q.model, dest / "model.safetensors")
    again = Llava.load(dest, dtype="bfloat16", device="cpu", threads=1)  # no --quantize: the file says it
    ids = prompt_ids(q)
    tokens = greedy(q.model, ids, 4)
    torch.testing.assert_close(forced_logits(again.model, ids, tokens), forced_logits(q.model, ids, tokens),
                               rtol=0, atol=0)
    other = "int4" if mode == "int8" else "int8"
    with pytest.raises(LlavaError, match=f"already quantized as {mode}"):
        Llava.load(dest, dtype="bfloat16", device="cpu", quantize=other)


def test_an_int8_checkpoint_saved_with_its_tied_head_left_out_still_loads(tiny, tmp_path):
    """Saved before int8 quantized a tied head: the loader quantizes the head from the embedding, as at load."""
    src = tiny("qwen").folder
    q = Llava.load(src, dtype="bfloat16", device="cpu", threads=1, quantize="int8")
    dest = shutil.copytree(src, tmp_path / "q", ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    quant.save(q.model, dest / "model.safetensors")
    tensors = load_file(dest / "model.safetensors")
    assert {"language_model.lm_head.qweight", "language_model.lm_head.scales"} <= tensors.keys()
    old = {k: v for k, v in tensors.items() if not k.startswith("language_model.lm_head.")}
    save_file(old, dest / "model.safetensors", metadata={"format": "pt", quant.METADATA_KEY: "int8"})
    again = Llava.load(dest, dtype="bfloat16", device="cpu", threads=1)
    assert isinstance(again.model.language_model.lm_head, quant.Int8Linear)
    ids = prompt_ids(q)
    tokens = greedy(q.model, ids, 4)
    torch.testing.assert_close(forced_logits(again.model, ids, tokens), forced_logits(q.model, ids, tokens),
                               rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_tied_head_is_quantized_before_the_next_tensor_is_read(tiny, mode, monkeypatch):
    """read_tensors drops a tensor's pages from the process when the next one is asked for, so the head is quantized
    from the embedding while its pages are still in: done at the end, the whole table would stay in memory."""
    from llava_cli import weights

    events, real_read, layer = [], weights.read_tensors, quant.Int8Linear if mode == "int8" else quant.Int4Linear
    real_encode = layer.encode

    def read(files):
        for key, path, t in real_read(files):
            events.append(weights.canonical(key))
            yield key, path, t

    def encode(self, w):
        events.append(("encode", tuple(w.shape)))
        return real_encode(self, w)
    monkeypatch.setattr(weights, "read_tensors", read)
    monkeypatch.setattr(layer, "encode", encode)
    llava = Llava.load(tiny("qwen").folder, dtype="bfloat16", device="cpu", threads=1, quantize=mode)
    embed = events.index("language_model.model.embed_tokens.weight")
    assert events[embed + 1] == ("encode", tuple(llava.model.language_model.model.embed_tokens.weight.shape))
    # every layer quantized once, the head included
    assert sum(1 for e in events if e[0] == "encode") == sum(isinstance(m, layer) for m in llava.model.modules())


def test_unknown_or_misplaced_quantization_is_a_one_line_error(tiny):
    folder = tiny("qwen").folder
    with pytest.raises(LlavaError, match="unknown quantization 'int3'"):
        Llava.load(folder, device="cpu", quantize="int3")
    with pytest.raises(LlavaError, match="nf4 quantization needs CUDA"):
        Llava.load(folder, device="cpu", quantize="nf4")


def test_a_plain_checkpoint_saved_by_hand_is_not_taken_for_quantized(tiny, tmp_path):
    folder = shutil.copytree(tiny("qwen").folder, tmp_path / "c")
    tensors = load_file(folder / "model.safetensors")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    model = Llava.load(folder, dtype="float32", device="cpu", threads=1).model
    assert not any(isinstance(m, quant.Quantized) for m in model.modules())


# ------------------------------------------------------------------------------------------------ threads

def test_omp_num_threads_is_the_default_when_set(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert devices.default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert 1 <= devices.default_threads() <= devices.usable_cores()


def test_thread_tuner_counts_only_other_processes_work():
    before = torch.get_num_threads()
    try:
        tuner = devices.ThreadTuner()
        end = time.monotonic() + 0.2
        while time.monotonic() < end:  # our own busy work must not make the tuner shrink the count
            pass
        n = tuner.retune()
        assert 1 <= n <= devices.usable_cores() and torch.get_num_threads() == n
        assert tuner.retune() == n  # a window too short to judge keeps the count
    finally:
        torch.set_num_threads(before)


def test_thread_count(tiny):
    before = torch.get_num_threads()
    try:
        assert 1 <= devices.default_threads() <= devices.usable_cores()
        Llava.load(tiny("qwen").folder, dtype="float32", device="cpu", threads=1)
        assert torch.get_num_threads() == 1
        with pytest.raises(LlavaError, match="threads must be at least 1"):
            devices.set_threads(0)
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ prefill, last only

def _prefill(model, ids: list[list[int]], last_only: bool, past: int = 0):
    """Logits of a prefill of `ids` after `past` cached slots (the cache already holding them), and the cache."""
    from llava_cli.generate import left_pad, prefill_mask

    x, valid = left_pad(ids, 0, torch.device("cpu"))
    padded = not bool(valid.all())
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0) + past
    with torch.inference_mode():
        out = model(model.embed(x, None), Step(past, positions, prefill_mask(valid) if padded else None), last_only)
    return out[:, -1:], model.cache.k.clone(), model.cache.v.clone()


@pytest.mark.parametrize("family", ["qwen", "llava", "vipllava"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_prefill_for_its_last_position_equals_the_whole_prefill(tiny, family, dtype):
    """The last layer computes its query, attention and MLP for the last position alone: the same logits (float32:
    1e-5; bfloat16: one-row products round where the many-row ones did, 2% of max |logit|) and the same cache, one
    prompt, a left-padded batch, and a chat turn after cached slots."""
    model = Llava.load(tiny(family).folder, dtype=dtype, device="cpu", threads=1).model
    atol = {"float32": 1e-5, "bfloat16": 0.02}[dtype]
    for ids, past in (([list(range(3, 40))], 0), ([list(range(3, 40)), list(range(5, 20))], 0),
                      ([list(range(3, 20))], 12)):
        got, want = [], []
        for last_only, into in ((True, got), (False, want)):
            model.setup_cache(len(ids), past + 40)
            torch.manual_seed(0)
            model.cache.k[:, :, :, :past] = torch.randn_like(model.cache.k[:, :, :, :past])
            model.cache.v[:, :, :, :past] = torch.randn_like(model.cache.v[:, :, :, :past])
            into.extend(_prefill(model, ids, last_only, past))
        scale = want[0].abs().max().item()
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=atol * (scale if dtype == "bfloat16" else 1))
        end = past + max(map(len, ids))
        torch.testing.assert_close(got[1][:, :, :, :end], want[1][:, :, :, :end], rtol=0, atol=0)
        torch.testing.assert_close(got[2][:, :, :, :end], want[2][:, :, :, :end], rtol=0, atol=0)


def test_only_the_last_position_goes_through_the_last_layer_s_mlp(tiny):
    model = Llava.load(tiny("qwen").folder, dtype="float32", device="cpu", threads=1).model
    rows = []
    hooks = [layer.mlp.down_proj.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:2]))
             for layer in model.language_model.model.layers[-2:]]
    model.setup_cache(2, 40)
    _prefill(model, [list(range(3, 33)), list(range(3, 23))], last_only=True)
    for h in hooks:
        h.remove()
    assert rows == [(2, 30), (2, 1)]


def test_int8_holds_its_weights_once_in_tiles_and_saves_them_as_rows(tiny, tmp_path, monkeypatch):
    """Where llava-cli's int8 kernel runs, each qweight is held in tiles (kernels.int8_tiles) instead of rows: one-row
    decode and a short chat turn read the tiles; a batch's decode turns them back into rows for torch's kernel,
    never holding both; the answers are those of a model that keeps rows, and what is saved is rows."""
    if kernels.int8_tiles(torch.zeros(4, 32, dtype=torch.int8)) is None:
        pytest.skip("llava-cli's int8 kernel cannot run here: the weights stay rows")
    folder = tiny("qwen").folder
    llava = Llava.load(folder, dtype="bfloat16", device="cpu", quantize="int8", threads=1)
    layers = {n: m for n, m in llava.model.named_modules() if isinstance(m, quant.Int8Linear)}
    assert layers and all(m.qweight.dim() == 4 for m in layers.values())
    ids = prompt_ids(llava)
    one = greedy(llava.model, ids)
    turn = [int(t) for t in generate(llava.model, [ids[:5]], None, max_new_tokens=4, past=len(ids))]  # chat turn
    assert len(turn) == 4 and all(m.qweight.dim() == 4 for m in layers.values())  # 5 positions: a row at a time
    saved = llava.model.state_dict()  # from the tiles
    quant.save(llava.model, tmp_path / "model.safetensors")
    two = [[int(t[0]), int(t[1])] for t in generate(llava.model, [ids, ids], None, max_new_tokens=STEPS)]
    assert all(m.qweight.dim() == 2 for m in layers.values())
    assert greedy(llava.model, ids) == one  # one row again, on the rows now
    monkeypatch.setattr(kernels, "int8_tiles", lambda q: None)  # as on a CPU without the kernel
    rows = Llava.load(folder, dtype="bfloat16", device="cpu", quantize="int8", threads=1)
    assert all(m.qweight.dim() == 2 for m in rows.model.modules() if isinstance(m, quant.Int8Linear))
    assert [a for a, _ in two] == [b for _, b in two] == greedy(rows.model, ids) == one
    kept, written = rows.model.state_dict(), load_file(tmp_path / "model.safetensors")
    for name in layers:
        assert torch.equal(saved[f"{name}.qweight"], kept[f"{name}.qweight"])
        assert torch.equal(written[f"{name}.qweight"], kept[f"{name}.qweight"])


def test_int4_builds_torch_s_packed_copy_only_when_a_few_rows_need_it(tiny, monkeypatch):
    """One-row decode and a short chat turn's few positions read qweight through llava-cli's kernel: `ask` and `chat`
    never hold torch's packed copy (as many bytes again); a batch's decode builds it, with the same answers as a
    model that packed at load."""
    if not kernels.int4_runs(torch.zeros(16, 64, dtype=torch.uint8), torch.zeros(16, 2, 2, dtype=torch.bfloat16)):
        pytest.skip("llava-cli's int4 kernel cannot run here: the copy is built at load")
    llava = Llava.load(tiny("qwen").folder, dtype="bfloat16", device="cpu", quantize="int4", threads=1)
    layers = quant.int4_layers(llava.model)
    assert layers and all(m.packed is None for m in layers)
    ids = prompt_ids(llava)
    assert len(ids) > KERNEL_ROWS  # a prefill of more rows dequantizes
    one = greedy(llava.model, ids)
    assert all(m.packed is None for m in layers)
    turn = [int(t) for t in generate(llava.model, [ids[:5]], None, max_new_tokens=4, past=len(ids))]  # chat turn
    assert len(turn) == 4 and all(m.packed is None for m in layers)  # 5 positions of one sequence: a row at a time
    two = [[int(t[0]), int(t[1])] for t in generate(llava.model, [ids, ids], None, max_new_tokens=STEPS)]
    assert all(m.packed is not None for m in layers)
    monkeypatch.setattr(kernels, "int4_runs", lambda *a: False)  # as on a CPU without the kernel
    eager = Llava.load(tiny("qwen").folder, dtype="bfloat16", device="cpu", quantize="int4", threads=1)
    assert all(m.packed is not None for m in quant.int4_layers(eager.model))
    assert [a for a, _ in two] == [b for _, b in two] == greedy(eager.model, ids) == one
