"""Our model against transformers on the same checkpoint files, through our real loader, in every key layout."""

import pytest
import torch
from PIL import Image

from checkpoints import DATA
from llava_cli.decoder import Step
from llava_cli.generate import generate
from llava_cli.pipeline import Llava
from llava_cli.templates import Message

FAMILIES = ["llava", "vipllava", "qwen"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def photo():
    return Image.open(DATA / "chelsea.png").convert("RGB")


def inputs(llava: Llava, photo, question="What is in the picture?"):
    prompt = llava.prompt([Message("user", question, images=1)])
    from llava_cli.image import preprocess

    return prompt.ids, preprocess([photo], llava.image_config)


def ours_logits(llava: Llava, ids, pixels):
    model = llava.model
    with torch.inference_mode():
        feats = model.encode_images(pixels)
        model.setup_cache(1, len(ids))
        step = Step(0, torch.arange(len(ids))[None], None)
        return model(model.embed(torch.tensor([ids]), feats), step, last_only=False)[0]


def ref_logits(ref, ids, pixels):
    with torch.inference_mode():
        return ref(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0].float()


def ref_greedy(ref, ids, pixels, n):
    with torch.inference_mode():
        out = ref.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout,shards", [("legacy", 1), ("v4.52", 1), ("v5", 1), ("legacy", 3)])
def test_logits_match_transformers(tiny, photo, family, layout, shards):
    t = tiny(family, layout=layout, shards=shards)
    llava = Llava.load(str(t.folder), dtype="float32", device="cpu")
    ids, pixels = inputs(llava, photo)
    assert ids.count(t.image_token_id) == llava.config.image_tokens
    ours, ref = ours_logits(llava, ids, pixels), ref_logits(t.model, ids, pixels)
    assert ours.shape == ref.shape == (len(ids), llava.config.text.vocab_size)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_match_transformers(tiny, photo, family):
    t = tiny(family)
    llava = Llava.load(str(t.folder), dtype="float32", device="cpu")
    ids, pixels = inputs(llava, photo)
    feats = llava.encode_images([photo])
    ours = [int(x) for x in generate(llava.model, [ids], feats, max_new_tokens=NEW_TOKENS)]
    ref = ref_greedy(t.model, ids, pixels, NEW_TOKENS)
    assert len(set(ours)) > 1, "a degenerate random model proves little"
    assert ours == ref


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_prompt_matches_transformers(tiny, family):
    t = tiny(family)
    llava = Llava.load(str(t.folder), dtype="float32", device="cpu")
    ids = llava.prompt([Message("system", "Be brief."), Message("user", "Say hello to the cat.")]).ids
    with torch.inference_mode():
        llava.model.setup_cache(1, len(ids))
        ours = llava.model(llava.model.embed(torch.tensor([ids]), None), Step(0, torch.arange(len(ids))[None], None), last_only=False)[0]
        ref = t.model(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


def test_vip_config_quirk_loads_the_five_layer_projector(tiny, photo):
    t = tiny("vipllava", vip_config_quirk=True)
    llava = Llava.load(str(t.folder), dtype="float32", device="cpu")
    assert llava.config.feature_layers == (-2, -5, -8, -11, 6)
    ids, pixels = inputs(llava, photo)
    torch.testing.assert_close(ours_logits(llava, ids, pixels), ref_logits(t.model, ids, pixels), rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_inputs_match_transformers(tiny, photo, family):
    """The whole input side at once: template, tokenizer, image-token expansion and pixels, as AutoProcessor does."""
    from transformers import AutoProcessor

    t = tiny(family)
    processor = AutoProcessor.from_pretrained(t.folder)
    llava = Llava(t.folder, "tiny")  # config, tokenizer and image settings; no weights needed
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    if llava.template.default_system:
        conversation.insert(0, {"role": "system", "content": [{"type": "text", "text": llava.template.default_system}]})
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    ref = processor(text=text, images=[photo], return_tensors="pt")
    ids, pixels = inputs(llava, photo)
    assert ids == ref["input_ids"][0].tolist()
    torch.testing.assert_close(pixels, ref["pixel_values"], rtol=0, atol=1e-5)


def test_left_padded_batch_matches_single_runs(tiny, photo):
    """The core takes a batch: rows of different lengths and images answer as they would alone."""
    t = tiny("qwen")
    llava = Llava.load(str(t.folder), dtype="float32", device="cpu")
    other = Image.open(DATA / "coffee.png").convert("RGB")
    prompts = [llava.prompt([Message("user", q, images=1)]) for q in ("What is this?", "Describe the colours in detail.")]
    batch = llava.answer_batch(prompts, [[photo], [other]], max_tokens=12)
    single = ["".join(llava.stream(p, [im], max_tokens=12)) for p, im in zip(prompts, [photo, other])]
    assert batch == single


def test_bfloat16_stays_close_to_float32(tiny, photo):
    t = tiny("llava")
    f32 = Llava.load(str(t.folder), dtype="float32", device="cpu")
    bf16 = Llava.load(str(t.folder), dtype="bfloat16", device="cpu")
    assert bf16.model.dtype == torch.bfloat16
    ids, pixels = inputs(f32, photo)
    a, b = ours_logits(f32, ids, pixels), ours_logits(bf16, ids, pixels)
    # bfloat16 keeps 8 bits of mantissa: compare the distributions, not the bits.
    assert torch.nn.functional.cosine_similarity(a[-1], b[-1], dim=0) > 0.99
