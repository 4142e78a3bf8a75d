"""Chat sessions: reusing the KV cache between turns must give exactly what re-running the whole history gives."""

import pytest
from PIL import Image

from checkpoints import DATA
from llava_cli.chat import ChatSession, Settings, image_sha256
from llava_cli.errors import LlavaError
from llava_cli.generate import generate
from llava_cli.pipeline import Llava


@pytest.fixture(scope="module")
def photos():
    return [Image.open(DATA / name).convert("RGB") for name in ("chelsea.png", "coffee.png")]


@pytest.fixture(scope="module")
def loaded(tiny):
    cache = {}

    def get(family: str) -> Llava:
        if family not in cache:
            cache[family] = Llava.load(tiny(family).folder, dtype="float32", device="cpu")
        return cache[family]

    return get


def from_scratch(llava: Llava, session: ChatSession) -> list[int]:
    """Greedy tokens of the session's last question, with the whole history rendered and prefilled afresh."""
    history = session.turns[:-1]
    last = session.turns[-1]
    session_turns, session.turns = session.turns, history
    session.pending = last.images
    prompt = session.prompt(last.text)
    session.turns, session.pending = session_turns, []
    images = [im.image for t in session.turns for im in t.images]
    kept, llava.model.cache = llava.model.cache, None  # nothing carried over; the session's cache is put back
    try:
        feats = llava.encode_images(images)
        max_new = min(session.settings.max_tokens, llava.config.context_length - prompt.tokens)
        tokens = generate(llava.model, [prompt.ids], feats, max_new_tokens=max_new, stop_ids=llava.stop_ids,
                          pad_id=llava.pad_id)
        return [int(t[0]) for t in tokens]
    finally:
        llava.model.cache = kept


@pytest.mark.parametrize("family", ["llava", "vipllava", "qwen"])
def test_three_turns_with_cache_reuse_equal_full_reprefill(loaded, photos, family):
    llava = loaded(family)
    session = ChatSession(llava, Settings(max_tokens=12))
    plan = [("What is in the picture?", photos[:1]), ("And what colour is it?", []),
            ("Compare it with this one.", photos[1:])]
    for turn, (question, images) in enumerate(plan):
        for im in images:
            session.add_image("test", im)
        answer = "".join(session.ask(question))
        assert session.turns[-1].answer == answer
        reused = session.stats.reused_tokens
        if turn:
            assert reused > 0  # the earlier turns were not prefilled again
        assert session.last_tokens == from_scratch(llava, session), f"turn {turn + 1}"
    assert len(session.turns) == 3


def test_next_turn_prefills_only_its_own_tokens(loaded, photos):
    llava = loaded("qwen")
    session = ChatSession(llava, Settings(max_tokens=6))
    session.add_image("a", photos[0])
    "".join(session.ask("Describe the picture."))
    first = session.stats.prompt_tokens
    "".join(session.ask("Anything else?"))
    # The whole first prompt comes from the cache, and so does the answer as far as its text re-tokenizes to the
    # ids that were generated (random weights write token runs that often re-tokenize otherwise).
    assert session.stats.reused_tokens >= first


def test_same_place_different_picture_is_not_reused(loaded, photos):
    llava = loaded("qwen")
    session = ChatSession(llava, Settings(max_tokens=4))
    session.add_image("a", photos[0])
    "".join(session.ask("What is it?"))
    session.undo()
    session.add_image("b", photos[1])
    "".join(session.ask("What is it?"))
    # the prompt text is the same up to the image: only the tokens before the image slots are reused
    ids = session.prompt().ids
    first_slot = ids.index(llava.config.image_token_id)
    assert session.stats.reused_tokens == first_slot
    assert session.last_tokens == from_scratch(llava, session)


def test_image_is_encoded_once_per_session(loaded, photos, monkeypatch):
    llava = loaded("qwen")
    calls = []
    real = llava.encode_images
    monkeypatch.setattr(llava, "encode_images", lambda images, *a, **k: calls.append(len(images)) or real(images))
    session = ChatSession(llava, Settings(max_tokens=3))
    session.add_image("a", photos[0])
    "".join(session.ask("One?"))
    session.clear()
    session.add_image("again", photos[0].copy())
    "".join(session.ask("Two?"))
    assert calls == [1]


def test_retry_and_undo(loaded, photos):
    llava = loaded("llava")
    session = ChatSession(llava, Settings(max_tokens=5))
    session.add_image("a", photos[0])
    first = "".join(session.ask("What is it?"))
    again = "".join(session.retry())
    assert again == first and len(session.turns) == 1  # greedy: the same answer
    assert session.stats.reused_tokens > 0
    assert session.undo().text == "What is it?"
    assert session.turns == [] and session.pending == []
    with pytest.raises(LlavaError):
        session.retry()


def test_interrupted_answer_keeps_the_conversation(loaded, photos):
    llava = loaded("qwen")
    session = ChatSession(llava, Settings(max_tokens=20))
    session.add_image("a", photos[0])
    chunks = session.ask("Tell me a long story.")
    next(chunks)
    chunks.close()  # what Ctrl-C does to the consumer
    assert len(session.turns) == 1 and session.stats.stop_reason == "interrupted"
    "".join(session.ask("Go on."))
    assert session.last_tokens == from_scratch(llava, session)


def test_interrupt_before_the_first_token_leaves_no_turn(loaded, photos):
    session = ChatSession(loaded("qwen"), Settings(max_tokens=5))
    session.add_image("a", photos[0])
    chunks = session.ask("Hello?")
    chunks.close()  # never started
    assert session.turns == [] and len(session.pending) == 1


@pytest.mark.parametrize("name,value,message", [
    ("temperature", "-1", "temperature"), ("top_p", "2", "top-p"), ("max_tokens", "0", "max_tokens"),
    ("seed", "x", "integer"), ("colour", "1", "unknown setting"),
])
def test_bad_settings_are_refused(name, value, message):
    with pytest.raises(LlavaError, match=message):
        Settings().changed(name, value)


def test_settings_parse():
    s = Settings().changed("temperature", "0.7").changed("seed", "3").changed("max_tokens", "9")
    assert (s.temperature, s.seed, s.max_tokens) == (0.7, 3, 9)
    assert s.changed("seed", "none").seed is None


def test_image_hash_is_of_pixels(photos):
    assert image_sha256(photos[0]) == image_sha256(photos[0].copy())
    assert image_sha256(photos[0]) != image_sha256(photos[1])
