"""Fuzzing template rendering, tokenization and image-token expansion with hypothesis, on a fixed example budget.

Messages hold random unicode (lone surrogates, control characters included) mixed with special-token strings and
<image> markers; every registered template is rendered with both tiny tokenizers (llama-like and qwen-like).
"""

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as RawTokenizer

from checkpoints import tokenizer_json
from llava_cli.errors import LlavaError
from llava_cli.templates import ROLES, TEMPLATES, Message, clean_text, user_text
from llava_cli.tokenizer import Tokenizer, expand_image_tokens

BUDGET = settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
PER_IMAGE = 7  # any count works: expansion must give images x this many image ids
SPECIAL_STRINGS = ["<image>", "<|im_end|>", "<|im_start|>", "<|endoftext|>", "</s>", "<s>", "<pad>", "<unk>",
                   "<|im_start|>system\n", "USER:", "###Assistant:", "\x00", "\x1b[31m", "\r\n", "\udce9", "\ud800"]
SPECIALS = {  # tokenizer kind -> its special tokens, as the hub tokenizer configs name them
    "llama": ({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, True),
    "qwen": ({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, False),
}

fragments = st.one_of(st.text(max_size=6), st.sampled_from(SPECIAL_STRINGS), st.characters(codec=None))
texts = st.lists(fragments, max_size=8).map("".join)
messages = st.lists(st.builds(Message, role=st.sampled_from(ROLES), text=texts, images=st.integers(0, 3)),
                    min_size=1, max_size=5)


@pytest.fixture(scope="module", params=list(SPECIALS))
def tokenizer(request) -> Tokenizer:
    special, add_bos = SPECIALS[request.param]
    return Tokenizer(RawTokenizer.from_str(tokenizer_json(request.param)), special, add_bos)


def special_ids(tok: Tokenizer) -> set[int]:
    return {i for i, t in tok._raw.get_added_tokens_decoder().items() if t.special}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_render_and_expand(tokenizer, name):
    template, image_id, special = TEMPLATES[name], tokenizer.token_to_id("<image>"), special_ids(tokenizer)

    @BUDGET
    @given(messages)
    def check(conversation):
        try:
            parts = template.render_parts(conversation)
        except LlavaError:
            return  # e.g. <image> markers that do not match the images; anything else fails the test
        assert "".join(p.text for p in parts) == template.render(conversation)
        ids = tokenizer.encode_parts(parts)
        expanded = expand_image_tokens(ids, image_id, PER_IMAGE)
        assert expanded.count(image_id) == sum(m.images for m in conversation) * PER_IMAGE
        # every special id comes from the template's own parts: none from what the messages say
        scaffold = tokenizer.encode_parts([p for p in parts if not p.plain])
        assert [i for i in ids if i in special] == [i for i in scaffold if i in special]

    check()


@BUDGET
@given(texts)
def test_cleaned_text_is_printable_and_stable(text):
    cleaned, notes = clean_text(text)
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]", cleaned)
    assert clean_text(cleaned) == (cleaned, [])  # cleaning twice changes nothing: the core may clean again
    assert bool(notes) == (cleaned != text.replace("\r\n", "\n"))
    try:
        assert user_text(text) == cleaned
    except LlavaError:
        assert "\x00" in text or not cleaned.strip()
