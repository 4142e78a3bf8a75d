"""The engine on a small random model of our own: cache equivalence, padding, sampling, stops."""

import pytest
import torch

from llava_cli.config import LlavaConfig
from llava_cli.decoder import Step
from llava_cli.errors import LlavaError
from llava_cli.generate import Sampling, generate, left_pad, prefill_mask, sample
from llava_cli.llava import LlavaModel
from llava_cli.answers import StopFilter

IMAGE_ID = 90
CONFIG = {
    "model_type": "llava",
    "image_token_index": IMAGE_ID,
    "vision_feature_select_strategy": "default",
    "text_config": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 128},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 32,
                      "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = LlavaModel(LlavaConfig.from_dict(CONFIG))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    m.language_model.tie_weights()
    return m.eval().requires_grad_(False)


def full_logits(model, ids):
    """Logits of every position from one forward pass without reuse."""
    t = len(ids)
    model.setup_cache(1, t)
    return model(model.embed(torch.tensor([ids]), None), Step(0, torch.arange(t)[None], None), last_only=False)[0]


def greedy(model, prompts, n=12, stop=()):
    return torch.stack(list(generate(model, prompts, None, max_new_tokens=n, stop_ids=stop))).T.tolist()


def test_cached_decoding_equals_a_full_forward(model):
    prompt = [3, 14, 15, 92 % 90, 65, 35]
    out = greedy(model, [prompt], n=10)[0]
    seq = prompt + out
    ref = full_logits(model, seq)
    # Each generated token is the argmax of the full forward at the position before it.
    assert ref[len(prompt) - 1:-1].argmax(-1).tolist() == out
    # And the cached step's logits equal the full forward's (fp32, different matmul shapes only).
    model.setup_cache(1, len(seq))
    logits = model(model.embed(torch.tensor([prompt]), None), Step(0, torch.arange(len(prompt))[None], None))
    for i, tok in enumerate(out[:-1]):
        pos = len(prompt) + i
        logits = model(model.embed(torch.tensor([[tok]]), None), Step(pos, torch.tensor([[pos]]), None))
        torch.testing.assert_close(logits[0, 0], ref[pos], rtol=0, atol=1e-5)


def test_left_padded_batch_equals_one_at_a_time(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]
    batched = greedy(model, prompts)
    assert batched == [greedy(model, [p])[0] for p in prompts]


def test_padding_rows_never_produce_nan(model):
    ids, valid = left_pad([[1, 2, 3, 4], [5]], pad_id=0, device=torch.device("cpu"))
    model.setup_cache(2, 4)
    step = Step(0, (valid.long().cumsum(-1) - 1).clamp(min=0), prefill_mask(valid))
    logits = model(model.embed(ids, None), step, last_only=False)
    assert torch.isfinite(logits).all()


def test_stop_ids_end_generation_and_max_tokens_bounds_it(model):
    free = greedy(model, [[1, 2, 3]], n=12)[0]
    stop = free[4]
    stopped = greedy(model, [[1, 2, 3]], n=12, stop=[stop])[0]
    assert stopped == free[: free.index(stop) + 1]
    assert len(greedy(model, [[1, 2, 3]], n=3)[0]) == 3


def test_image_features_fill_the_image_positions(model):
    torch.manual_seed(1)
    feats = model.encode_images(torch.randn(2, 3, 28, 28))  # (2, 4, 32): CLIP 2x2 patches, class token dropped
    assert feats.shape == (2, 4, 32)
    ids = torch.tensor([[1] + [IMAGE_ID] * 4 + [2] + [IMAGE_ID] * 4])
    emb = model.embed(ids, feats)
    torch.testing.assert_close(emb[0, 1:5], feats[0])
    torch.testing.assert_close(emb[0, 6:10], feats[1])
    with pytest.raises(LlavaError, match="8 image tokens but the images give 4"):
        model.embed(ids, feats[:1])


def test_seeded_sampling_is_reproducible_and_seeds_differ(model):
    def run(seed):
        s = Sampling(temperature=1.5, seed=seed)
        return [int(t) for t in generate(model, [[1, 2, 3]], None, max_new_tokens=16, sampling=s)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50)
    best = logits.argmax(-1)
    assert torch.equal(sample(logits, Sampling(temperature=2.0, top_k=1, seed=0), torch.Generator().manual_seed(0)), best)
    assert torch.equal(sample(logits, Sampling(temperature=2.0, top_p=1e-6), torch.Generator().manual_seed(0)), best)


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    seen = {int(sample(logits, Sampling(temperature=1.0, top_p=0.8), gen)) for _ in range(300)}
    assert seen == {0, 1}


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2)])
def test_bad_sampling_settings_are_errors(bad):
    with pytest.raises(LlavaError):
        Sampling(**bad)


def test_stop_filter_holds_back_a_possible_stop_and_cuts_at_it():
    f = StopFilter(["###"])
    assert f.push("Hello #") == "Hello "
    assert f.push("# there") == "## there"  # '## ' cannot start '###' any more
    assert f.push(" ##") == " "
    assert f.push("#Human") == ""
    assert f.stopped
    g = StopFilter(["###"])
    assert g.push("a#") == "a" and g.flush() == "#"
