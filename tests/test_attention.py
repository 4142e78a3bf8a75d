"""llava-cli's attention kernel (kernels.attention, attn.c: the vision tower and the prefill) against float32
attention of the same bfloat16 inputs, what it declines, and the models that run through it.

Tolerance: like torch's CPU flash attention in bfloat16, the kernel keeps scores and the softmax in float32, rounds
the unnormalised probabilities to bfloat16 (each off by at most 2^-9 of itself), sums in float32 and rounds the
output once. So per output element |y - ref| <= 2^-8 (|ref| + sum_j p_j |v_j|), with p the float32 probabilities:
twice those two roundings, far above the float32 summation-order error. Through a model: features within 3% of the
largest |feature| of the SDPA run (a few bfloat16 ulps a layer), and the same greedy tokens.
"""

import pytest
import torch

from llava_cli import kernels
from llava_cli.cli import app
from llava_cli.pipeline import Llava
from test_fast_paths import greedy, prompt_ids

RUNS = (kernels.load() is not None and kernels._amx() is None)
needs_kernel = pytest.mark.skipif(not RUNS, reason="the attention kernel does not run on this machine")
SHAPES = [  # B, H, Hkv, Tq, Tk, D, causal
    (1, 16, 16, 729, 729, 72, False),  # SigLIP (interleave-qwen): 27 x 27 patches, heads of 72
    (1, 16, 16, 577, 577, 64, False),  # CLIP ViT-L/336 (llava-1.5): a class token and 24 x 24 patches
    (1, 14, 2, 300, 300, 64, True),  # Qwen2 GQA prefill (7 query heads a key-value head)
    (2, 4, 2, 37, 37, 64, False),  # a batch of images
    (1, 4, 1, 50, 50, 128, True),  # the widest head it takes
    (1, 2, 2, 5, 21, 72, True),  # 5 new tokens after 16 cached: the diagonal moved right
    (1, 3, 3, 17, 17, 8, False),  # a one-tile head, a 1-query tail block
    (1, 2, 2, 33, 33, 96, False),
    (1, 2, 2, 16, 16, 40, True),
    (1, 1, 1, 1, 1, 2, False),
]


def reference(q, k, v, causal):
    """float32 attention of the same inputs, and the bound above."""
    h, hkv, tq, tk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k, v = (t.float().repeat_interleave(h // hkv, 1) for t in (k, v))
    s = q.float() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        s = s.masked_fill(~torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq), float("-inf"))
    p = s.softmax(-1)
    ref, spread = (t.transpose(1, 2).reshape(q.shape[0], tq, -1) for t in (p @ v, p @ v.abs()))  # (B, Tq, H * D)
    return ref, 2**-8 * (ref.abs() + spread)


def inputs(b, h, hkv, tq, tk, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q scaled up: peaked softmax rows, where rounding the probabilities matters most
    return [(torch.randn(b, n, t, d, generator=g) * s).to(torch.bfloat16) for n, t, s in ((h, tq, 3), (hkv, tk, 1),
                                                                                            (hkv, tk, 1))]


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_float32_attention_within_bfloat16_rounding(shape, threads, monkeypatch):
    *dims, causal = shape
    q, k, v = inputs(*dims)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    y = kernels.attention(q, k, v, causal)
    ref, tol = reference(q, k, v, causal)
    assert y is not None and y.dtype == torch.bfloat16 and y.shape == ref.shape and y.is_contiguous()
    assert ((y.float() - ref).abs() <= tol).all(), (y.float() - ref).abs().max()
    assert kernels.attention_outcome == "attention: llava-cli's kernel"


@needs_kernel
def test_kernel_reads_strided_views_as_the_layers_pass_them():
    """The vision tower passes q/k/v as (N, H, T, D) views of (N, T, H * D) projections; the decoder the KV cache's
    (B, Hkv, :end, D) slices of a longer buffer. Same answer as from contiguous copies, bit for bit."""
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 45, 3, 6, 40, generator=g).to(torch.bfloat16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert kernels.attention(q, k, v, False).equal(kernels.attention(q.contiguous(), k.contiguous(),
                                                                     v.contiguous(), False))
    cache = torch.randn(2, 1, 3, 100, 32, generator=g).to(torch.bfloat16)
    q = torch.randn(1, 6, 60, 32, generator=g).to(torch.bfloat16)
    k, v = cache[0, :, :, :60], cache[1, :, :, :60]
    assert kernels.attention(q, k, v, True).equal(kernels.attention(q, k.contiguous(), v.contiguous(), True))


@pytest.mark.parametrize("change,why", [
    (lambda q, k, v: (q.float(), k.float(), v.float()), "float32: it takes bfloat16"),
    (lambda q, k, v: (q, k.half(), v), "float16: it takes bfloat16"),
    (lambda q, k, v: (q.to("meta"), k, v), "on meta: it runs on the CPU"),
    (lambda q, k, v: (q[0], k[0], v[0]), "not 4D tensors"),
    (lambda q, k, v: (q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3)), "not 4D tensors with contiguous"),
    (lambda q, k, v: (q[..., :7], k[..., :7], v[..., :7]), "head size 7"),
    (lambda q, k, v: (q.repeat(1, 1, 1, 3), k.repeat(1, 1, 1, 3), v.repeat(1, 1, 1, 3)), "head size 192"),
    (lambda q, k, v: (q, k[:, :, :5], v[:, :, :5]), "shapes"),  # causal with more queries than keys
    (lambda q, k, v: (q, k, v[:, :, :9]), "shapes"),
    (lambda q, k, v: (q[:, :3], k, v), "shapes"),  # 3 query heads over 2 key-value heads
])
def test_what_the_kernel_does_not_take_is_declined_with_a_reason(change, why):
    q, k, v = change(*inputs(1, 4, 2, 10, 10, 64))
    assert kernels.attention(q, k, v, causal=True) is None
    assert kernels.attention_outcome.startswith("attention: torch's (") and why in kernels.attention_outcome


def test_cpus_with_amx_keep_torch_s_attention(monkeypatch):
    monkeypatch.setattr(kernels, "_cpu_has", lambda flags: "amx_bf16" in flags)
    assert kernels.attention(*inputs(1, 2, 2, 8, 8, 64), causal=False) is None
    assert "AMX" in kernels.attention_outcome


# ------------------------------------------------------------------------------------------------ through the models

def _spied(monkeypatch) -> list[tuple]:
    """Record (shape of q, causal, ran) for every kernels.attention call."""
    calls, real = [], kernels.attention

    def spy(q, k, v, causal):
        y = real(q, k, v, causal)
        calls.append((tuple(q.shape), causal, y is not None))
        return y
    monkeypatch.setattr(kernels, "attention", spy)
    return calls


def _sdpa_only(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "attention", lambda *args, **kwargs: None)


@needs_kernel
@pytest.mark.parametrize("family", ["llava", "qwen", "vipllava"])
def test_vision_features_through_the_kernel_equal_sdpa_within_tolerance(tiny, family, monkeypatch):
    llava = Llava.load(tiny(family, dtype=torch.bfloat16).folder, dtype="bfloat16", device="cpu")
    size = llava.model.cfg.vision.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        with monkeypatch.context() as m:
            _sdpa_only(m)
            plain = llava.model.encode_images(pixels).float()
        calls = _spied(monkeypatch)
        fast = llava.model.encode_images(pixels).float()
    assert calls and all(ran and not causal and shape[0] == 2 for shape, causal, ran in calls)
    assert (fast - plain).abs().max() <= 0.03 * plain.abs().max()


@needs_kernel
@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_prefill_through_the_kernel_gives_sdpa_s_greedy_tokens(tiny, family, monkeypatch):
    llava = Llava.load(tiny(family, dtype=torch.bfloat16).folder, dtype="bfloat16", device="cpu")
    ids = prompt_ids(llava)
    with monkeypatch.context() as m:
        _sdpa_only(m)
        plain = greedy(llava.model, ids)
    calls = _spied(monkeypatch)
    assert greedy(llava.model, ids) == plain
    n_layers = llava.model.cfg.text.num_hidden_layers  # the last layer's one query (its last position) takes SDPA
    assert [c for c in calls if c[1]] == [((1, llava.model.cfg.text.num_attention_heads, len(ids),
                                            llava.model.cfg.text.head_dim), True, True)] * (n_layers - 1)


@needs_kernel
def test_ask_verbose_names_the_attention_path(tiny, runner, monkeypatch):
    folder = str(tiny("qwen", dtype=torch.bfloat16).folder)
    r = runner.invoke(app, ["ask", "-m", folder, "--dtype", "bfloat16", "--max-tokens", "2", "-v", "hi"])
    assert r.exit_code == 0 and "; attention: llava-cli's kernel" in r.stderr.splitlines()[-1], r.stderr
    monkeypatch.setattr(kernels, "_cpu_has", lambda flags: "amx_bf16" in flags)
    r = runner.invoke(app, ["ask", "-m", folder, "--dtype", "bfloat16", "--max-tokens", "2", "-v", "hi"])
    assert "; attention: torch's (the CPU has AMX, where torch's is faster)" in r.stderr.splitlines()[-1], r.stderr


@needs_kernel
def test_a_prefill_after_cached_tokens_sees_the_past_and_itself_causally(tiny, monkeypatch):
    """A chat turn prefills its new tokens after the cached ones: the kernel's causal diagonal starts at the first new
    token's slot (Tq < Tk), as SDPA's fallback mask does; both equal one prefill of the whole prompt."""
    from llava_cli.decoder import Step

    llava = Llava.load(tiny("qwen", dtype=torch.bfloat16).folder, dtype="bfloat16", device="cpu")
    model, ids = llava.model, prompt_ids(llava)
    split = len(ids) // 2

    def logits(ids_first, ids_then):
        with torch.inference_mode():
            model.setup_cache(1, len(ids) + 1)
            model(model.embed(torch.tensor([ids_first]), None), Step(0, torch.arange(len(ids_first))[None], None))
            n = len(ids_first)
            return model(model.embed(torch.tensor([ids_then]), None),
                         Step(n, torch.arange(n, n + len(ids_then))[None], None), last_only=False)[0].float()

    with monkeypatch.context() as m:
        _sdpa_only(m)
        plain = logits(ids[:split], ids[split:])
    calls = _spied(monkeypatch)
    fast = logits(ids[:split], ids[split:])
    assert ((1, llava.model.cfg.text.num_attention_heads, len(ids) - split, llava.model.cfg.text.head_dim), True,
            True) in calls
    with torch.inference_mode():
        model.setup_cache(1, len(ids))
        whole = model(model.embed(torch.tensor([ids]), None), Step(0, torch.arange(len(ids))[None], None),
                      last_only=False)[0, split:].float()
    for got in (plain, fast):
        assert (got - whole).abs().max() <= 0.03 * whole.abs().max()
    assert (fast - plain).abs().max() <= 0.03 * plain.abs().max()
