"""Our tokenizer gives the ids and text transformers 5 gives, for the real llava-1.5 and interleave-qwen tokenizers."""

import json
import random
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models, processors

from llava_cli.errors import LlavaError
from llava_cli.templates import Message, get_template
from llava_cli.tokenizer import Tokenizer, expand_image_tokens

HERE = Path(__file__).resolve().parent
SHARED_HUBMETA = Path(__file__).resolve().parents[1].parent / "shared" / "hubmeta"
FILES = (  # as on the hub: config.json decides which tokenizer class transformers builds
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
)
# folder -> (templates rendered with its tokenizer, image tokens per image in the llava processor)
FAMILIES = {
    "llava-hf__llava-1.5-7b-hf": (("llava-1.5", "vip-llava"), 576),  # vip-llava ships the same llama tokenizer
    "llava-hf__llava-interleave-qwen-0.5b-hf": (("interleave-qwen",), 729),
}

TEXTS = [
    "Hello world",
    " leading space",
    "   three leading spaces",
    "multiple   spaces  inside",
    "trailing spaces   ",
    "\nstarts with a newline",
    "line one\nline two\n\n\nline five\r\n",
    "\ttabs\tand\u00a0no-break space",
    "café, naïve, Ångström, São Paulo",
    "中文字符和日本語のテキスト",
    "emoji 😀👍🏽 and flags 🇫🇷 🐈‍⬛",
    "digits 1234567890 and 3.14159 and 1,000,000",
    "USER: <image>\nWhat is in the picture? ASSISTANT:",
    "before<image>after",
    "two <image><image> images",
    "</s>text right after a special token",
    "<s> text after a BOS",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_end|>right after",
    "don't won't it's I'll we've they're",
    "",
]


def processor_folder(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    if not (SHARED_HUBMETA / name / "tokenizer.json").is_file():
        pytest.skip(f"no real tokenizer.json in {SHARED_HUBMETA / name}")
    folder = tmp_path_factory.mktemp(name)
    for file in FILES:
        source = SHARED_HUBMETA / name / file
        shutil.copy(source if source.is_file() else HERE / "data" / "hubmeta" / name / file, folder / file)
    return folder


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, our tokenizer, transformers' processor), loaded once per module."""
    transformers = pytest.importorskip("transformers")
    folder = processor_folder(tmp_path_factory, request.param)
    processor = transformers.AutoProcessor.from_pretrained(folder)
    return request.param, Tokenizer.from_folder(folder), processor


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    return Image.open(HERE / "data" / "chelsea.png").convert("RGB")


@pytest.mark.parametrize("text", TEXTS)
def test_encode_equals_transformers(family, text: str) -> None:
    _, ours, processor = family
    assert ours.encode(text) == processor.tokenizer(text)["input_ids"]


def test_special_ids_equal_transformers(family) -> None:
    _, ours, processor = family
    ref = processor.tokenizer
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert ours.add_bos == (ref("x")["input_ids"][0] == ref.bos_token_id)
    assert len(ours) == len(ref)
    assert ours.token_to_id("<image>") == ref.convert_tokens_to_ids("<image>")
    assert ours.token_to_id("<no such token>") is None


def test_pipeline_equals_transformers_backend(family) -> None:
    # transformers builds TokenizersBackend for llava checkpoints: tokenizer.json's own pipeline, unchanged.
    _, ours, processor = family
    assert type(processor.tokenizer).__name__ == "TokenizersBackend"
    for part in ("normalizer", "pre_tokenizer", "decoder", "post_processor"):
        mine, theirs = getattr(ours._raw, part), getattr(processor.tokenizer.backend_tokenizer, part)
        assert (mine and json.loads(mine.__getstate__())) == (theirs and json.loads(theirs.__getstate__())), part


def prompts(name: str) -> list[tuple[str, int]]:
    """(rendered prompt, image count) for the conversations a user sends."""
    conversations = [
        [Message("user", "What is shown in this image?", images=1)],
        [Message("user", " Describe  it,\nthen rate it 1-10. Très bien 👍", images=1)],
        [Message("user", "What differs?", images=2)],
        [Message("user", "Compare <image> with <image>.", images=2)],
        [Message("user", "Tell me a joke.")],
        [Message("system", "Be brief."), Message("user", "What is it?", images=1)],
        [
            Message("user", "What animal is this?", images=1),
            Message("assistant", "A cat."),
            Message("user", "What colour?"),
        ],
    ]
    return [(get_template(name).render(c), sum(m.images for m in c)) for c in conversations]


def test_prompts_equal_processor_input_ids(family, image) -> None:
    name, ours, processor = family
    templates, per_image = FAMILIES[name]
    image_id = ours.token_to_id("<image>")
    for template in templates:
        for prompt, images in prompts(template):
            inputs = processor(text=prompt, images=[image] * images if images else None)
            expected = inputs["input_ids"][0]
            assert expected.count(image_id) == images * per_image  # the processor expanded every marker
            assert expand_image_tokens(ours.encode(prompt), image_id, per_image) == expected, (template, prompt)


def generated_like(ours: Tokenizer, seed: int) -> list[int]:
    """Answer-like ids: encoded text (no BOS), special tokens mixed in, random vocabulary ids, EOS at the end."""
    rng = random.Random(seed)
    ids = ours.encode(rng.choice(TEXTS[:12]) + " " + rng.choice(TEXTS[:12]))
    ids = ids[1:] if ours.add_bos else ids
    specials = [i for i in (ours.bos_id, ours.pad_id, ours.token_to_id("<image>")) if i is not None]
    for _ in range(3):
        ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
    ids += [rng.randrange(len(ours)) for _ in range(rng.randrange(8))]
    return ids + [ours.eos_id]


@pytest.mark.parametrize("seed", range(12))
def test_decode_equals_transformers(family, seed: int) -> None:
    _, ours, processor = family
    ids = generated_like(ours, seed)
    assert ours.decode(ids) == processor.tokenizer.decode(ids, skip_special_tokens=True)


STREAMED = [
    "Ceci est un chat tigré, très mignon. 😀",
    "这是一只猫。它在看着你。",
    "mixed: naïve 東京 🐈‍⬛ 👍🏽 done",
    " leading space and trailing newline\n",
]


@pytest.mark.parametrize("text", STREAMED)
def test_stream_pieces_join_to_decode(family, text: str) -> None:
    _, ours, processor = family
    ids = ours.encode(text)  # BOS included: a skipped special token at the start of a stream
    stream = ours.stream()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == ours.decode(ids) == processor.tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in piece for piece in pieces)


def test_stream_holds_back_split_characters(family) -> None:
    # The case the stream exists for: a character whose bytes span tokens (llama <0xF0>-style byte fallback,
    # qwen byte-level pieces). Some push must return '' mid-character and a later one the whole character.
    _, ours, _ = family
    ids = ours.encode("🐈‍⬛😀")
    stream = ours.stream()
    pieces = [stream.push(i) for i in ids]
    assert "" in pieces[1:] and "".join(pieces) == "🐈‍⬛😀"


def test_llava_prompt_keeps_the_space_piece_after_the_image_token(tmp_path_factory) -> None:
    # What a hub checkpoint gives (and the original LLaVA training used): "<image>\n" is <image> "▁" "\n". The
    # LlamaTokenizer class that tokenizer_config.json names would drop the "▁"; transformers does not build it for
    # llava checkpoints, and neither do we.
    folder = processor_folder(tmp_path_factory, "llava-hf__llava-1.5-7b-hf")
    ids = Tokenizer.from_folder(folder).encode("USER: <image>\nWhat?")
    assert ids[5:8] == [32000, 29871, 13]


def test_expand_image_tokens() -> None:
    assert expand_image_tokens([1, 5, 9, 5, 2], image_id=5, per_image=3) == [1, 5, 5, 5, 9, 5, 5, 5, 2]
    assert expand_image_tokens([1, 9], image_id=5, per_image=3) == [1, 9]


def tiny_folder(folder: Path, config: dict | None, special_map: dict | None = None, bos_template=False) -> Path:
    """A word-level tokenizer.json with a few tokens (its post-processor adding <s> if asked), plus the configs."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    if bos_template:
        raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    raw.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if special_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_map))
    return folder


def test_special_tokens_map_fills_gaps(tmp_path: Path) -> None:
    folder = tiny_folder(tmp_path, {"add_bos_token": True}, {"bos_token": {"content": "<s>"}, "eos_token": "</s>"})
    ours = Tokenizer.from_folder(folder)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos) == (1, 2, None, True)


@pytest.mark.parametrize(
    ("config", "bos_template", "expected"),
    [
        ({}, True, [1, 3]),  # no add_bos_token: the post-processor decides, as in transformers 5
        ({}, False, [3]),
        ({"add_bos_token": False}, True, [3]),  # an explicit config value wins
        ({"add_bos_token": True}, False, [1, 3]),
    ],
)
def test_bos_from_config_then_post_processor(tmp_path: Path, config, bos_template, expected) -> None:
    folder = tiny_folder(tmp_path, {"bos_token": "<s>", **config}, bos_template=bos_template)
    assert Tokenizer.from_folder(folder).encode("hello") == expected


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(LlavaError, match="tokenizer.json") as info:
        Tokenizer.from_folder(tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_sentencepiece_only_folder_points_to_convert(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(LlavaError, match="llava convert") as info:
        Tokenizer.from_folder(tmp_path)
    assert str(tmp_path) in str(info.value) and "tokenizer.json" in str(info.value)


def test_missing_tokenizer_config(tmp_path: Path) -> None:
    with pytest.raises(LlavaError, match="tokenizer_config.json") as info:
        Tokenizer.from_folder(tiny_folder(tmp_path, None))
    assert str(tmp_path) in str(info.value)


def test_config_added_tokens_join_the_vocabulary(tmp_path: Path) -> None:
    # transformers adds tokenizer_config.json's added_tokens_decoder entries; one tokenizer.json lacks is added
    # at the id the config names, and an entry whose id cannot be honoured is left out.
    image = {"content": "<image>", "lstrip": False, "normalized": False, "rstrip": False, "special": True}
    other = {**image, "content": "<other>"}
    ours = Tokenizer.from_folder(tiny_folder(tmp_path, {"added_tokens_decoder": {"4": image, "9": other}}))
    assert ours.token_to_id("<image>") == 4 and ours.token_to_id("<other>") is None
    assert ours.encode("hello<image>") == [3, 4]
    assert ours.decode([3, 4, 3]) == "hello hello"
