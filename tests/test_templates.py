"""The template registry renders exactly what each family's hub chat_template.json renders."""

import dataclasses
import json
from pathlib import Path

import jinja2
import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llava_cli.errors import LlavaError
from llava_cli.templates import TEMPLATES, Message, get_template, template_for

HUBMETA = Path(__file__).parent / "data" / "hubmeta"
HUB_TEMPLATE_OF = {
    "llava-1.5": "llava-hf__llava-1.5-7b-hf",
    "vip-llava": "llava-hf__vip-llava-7b-hf",
    "interleave-qwen": "llava-hf__llava-interleave-qwen-0.5b-hf",
}


class GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body, as in transformers (which also tracks offsets)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def hub_template(name: str) -> jinja2.Template:
    source = json.loads((HUBMETA / HUB_TEMPLATE_OF[name] / "chat_template.json").read_text())["chat_template"]
    # The environment transformers compiles chat templates with (utils/chat_template_utils.py).
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    return env.from_string(source)


def hf_messages(messages: list[Message]) -> list[dict]:
    """The HF processor message format: image entries then one text entry."""
    return [
        {"role": m.role, "content": [{"type": "image"}] * m.images + [{"type": "text", "text": m.text}]}
        for m in messages
    ]


# ViP-LLaVA's model card prompt starts with this line; the hub template prints a system message's text raw.
MODEL_CARD_SYSTEM = {
    "vip-llava": "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
}


def hub_render(name: str, messages: list[Message], add_generation_prompt: bool = True) -> str:
    default = MODEL_CARD_SYSTEM.get(name)
    if default is not None and not any(m.role == "system" for m in messages):
        messages = [Message("system", default), *messages]
    return hub_template(name).render(messages=hf_messages(messages), add_generation_prompt=add_generation_prompt)


CONVERSATIONS = {
    "one image": [Message("user", "What is shown in this image?", images=1)],
    "no image": [Message("user", "Tell me a joke.")],
    "two images": [Message("user", "What differs between these two pictures?", images=2)],
    "system": [Message("system", "You are a terse assistant."), Message("user", "Describe it.", images=1)],
    "multi-turn": [
        Message("user", "What animal is this?", images=1),
        Message("assistant", "It is a cat."),
        Message("user", "What colour is it?\nAnswer in one word."),
    ],
    "multi-turn with system": [
        Message("system", "Answer briefly."),
        Message("user", "What is it?", images=1),
        Message("assistant", "A cup of coffee."),
        Message("user", "Hot or cold?"),
    ],
    "unicode and spaces": [Message("user", "  Qu'est-ce que c'est ? 这是什么？ 🐱  ", images=1)],
}


@pytest.mark.parametrize("name", list(HUB_TEMPLATE_OF))
@pytest.mark.parametrize("case", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_equals_hub_chat_template(name: str, case: str, add_generation_prompt: bool) -> None:
    messages = CONVERSATIONS[case]
    expected = hub_render(name, messages, add_generation_prompt)
    assert get_template(name).render(messages, add_generation_prompt, as_generated=False) == expected


@pytest.mark.parametrize("name", list(HUB_TEMPLATE_OF))
def test_history_renders_assistant_turns_as_generated(name: str) -> None:
    # The default rendering writes an assistant turn exactly as it follows the generation prompt, so that the
    # tokens a chat cached while generating stay a prefix of the re-rendered conversation.
    template = get_template(name)
    history = [Message("user", "What is it?", images=1), Message("assistant", "A cat.")]
    rendered = template.render(history, add_generation_prompt=False)
    asked = template.render(history[:1])
    assert rendered.startswith(asked)
    # "ASSISTANT:" / "###Assistant:" are followed by the space the model writes; ChatML by the text itself.
    assert rendered.removeprefix(asked).startswith("A cat." if name == "interleave-qwen" else " A cat.")


@pytest.mark.parametrize("name", list(HUB_TEMPLATE_OF))
def test_jinja_helper_agrees_with_transformers(name: str) -> None:
    # Guards the helper above: transformers' own renderer gives the same text for the richest conversation.
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    messages = CONVERSATIONS["multi-turn with system"]
    source = json.loads((HUBMETA / HUB_TEMPLATE_OF[name] / "chat_template.json").read_text())["chat_template"]
    rendered, _ = chat_template_utils.render_jinja_template(
        conversations=[hf_messages(messages)], chat_template=source, add_generation_prompt=True
    )
    assert rendered[0] == hub_render(name, messages)


# The hub formats written out by hand, so a reader sees them at a glance.
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("llava-1.5", "USER: <image>\nWhat is shown in this image? ASSISTANT:"),
        (
            "vip-llava",
            "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
            "detailed, and polite answers to the human's questions.###Human: <image>\nWhat is shown in this image?"
            "###Assistant:",
        ),
        (
            "interleave-qwen",
            "<|im_start|>user\n<image>\nWhat is shown in this image?<|im_end|>\n<|im_start|>assistant\n",
        ),
    ],
)
def test_single_turn_exact_string(name: str, expected: str) -> None:
    assert get_template(name).render(CONVERSATIONS["one image"]) == expected


def test_vip_llava_keeps_an_explicit_system_message() -> None:
    text = get_template("vip-llava").render([Message("system", "Be brief."), Message("user", "Hi")])
    assert text == "Be brief.###Human: Hi###Assistant:"


@pytest.mark.parametrize("name", list(HUB_TEMPLATE_OF))
def test_markers_place_images_inside_the_text(name: str) -> None:
    template = get_template(name)
    text = template.render([Message("user", "Compare <image> with <image>, please.", images=2)])
    assert text.count("<image>") == 2
    assert "Compare <image> with <image>, please." in text
    # Same frame as an image-free message: only the text differs.
    plain = template.render([Message("user", "Compare X with Y, please.")])
    assert text.replace("<image>", "X", 1).replace("<image>", "Y", 1) == plain


@pytest.mark.parametrize(
    ("text", "images", "message"),
    [
        ("<image> and <image>", 1, "the prompt has 2 <image> markers but 1 image was given"
         "; give one image per marker, or no marker to put the images first"),
        ("look: <image>", 0, "the prompt has 1 <image> marker but 0 images were given"
         "; give one image per marker, or spell it another way (< image >) to mean the text"),
        ("<image>", 2, "the prompt has 1 <image> marker but 2 images were given"
         "; give one image per marker, or no marker to put the images first"),
    ],
)
def test_marker_count_must_match_images(text: str, images: int, message: str) -> None:
    with pytest.raises(LlavaError) as info:
        get_template("llava-1.5").render([Message("user", text, images=images)])
    assert str(info.value) == message


def test_unknown_role_is_an_error() -> None:
    with pytest.raises(LlavaError, match="tool"):
        get_template("llava-1.5").render([Message("tool", "x")])


@pytest.mark.parametrize(
    ("name", "stop_tokens", "stop_strings", "multi_image"),
    [
        ("llava-1.5", ("</s>",), (), False),
        ("vip-llava", ("</s>",), ("###",), False),
        ("interleave-qwen", ("<|im_end|>", "<|endoftext|>"), (), True),
    ],
)
def test_stops_and_image_support(name, stop_tokens, stop_strings, multi_image) -> None:
    template = get_template(name)
    assert template.stop_tokens == stop_tokens and template.stop_strings == stop_strings
    assert template.multi_image is multi_image


def test_stop_tokens_are_eos_of_the_checkpoint() -> None:
    # The first stop token of each family is the eos_token its hub tokenizer_config names.
    for name, folder in HUB_TEMPLATE_OF.items():
        config = json.loads((HUBMETA / folder / "tokenizer_config.json").read_text())
        assert get_template(name).stop_tokens[0] == config["eos_token"], name


def test_templates_are_frozen_data() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_template("llava-1.5").user_prefix = "HUMAN: "  # type: ignore[misc]


def test_unknown_template_lists_the_names() -> None:
    with pytest.raises(LlavaError) as info:
        get_template("chatml")
    assert all(name in str(info.value) for name in TEMPLATES)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("llava-hf__llava-1.5-7b-hf", "llava-1.5"),
        ("llava-hf__llava-1.5-13b-hf", "llava-1.5"),
        ("llava-hf__bakLlava-v1-hf", "llava-1.5"),
        ("llava-hf__vip-llava-7b-hf", "vip-llava"),
        ("llava-hf__vip-llava-13b-hf", "vip-llava"),
        ("llava-hf__llava-interleave-qwen-0.5b-hf", "interleave-qwen"),
        ("llava-hf__llava-interleave-qwen-7b-hf", "interleave-qwen"),
    ],
)
def test_template_for_hub_configs(folder: str, expected: str) -> None:
    config = json.loads((HUBMETA / folder / "config.json").read_text())
    types = (config["model_type"], config["text_config"]["model_type"], config["vision_config"]["model_type"])
    assert template_for(*types).name == expected


@pytest.mark.parametrize(
    "types", [("llava", "gemma", "siglip_vision_model"), ("llava_next", "llama", "clip_vision_model")]
)
def test_template_for_unknown_family_is_an_error(types) -> None:
    with pytest.raises(LlavaError) as info:
        template_for(*types)
    assert types[0] in str(info.value) and "\n" not in str(info.value)


HUB_CHAT_TEMPLATES = sorted(HUBMETA.glob("*/chat_template.json"))


@pytest.mark.parametrize("path", HUB_CHAT_TEMPLATES, ids=lambda p: p.parent.name)
def test_every_hub_chat_template_is_recognised_and_rendered_exactly(path: Path) -> None:
    from llava_cli.templates import template_of_checkpoint

    source = json.loads(path.read_text())["chat_template"]
    template = template_of_checkpoint(source)
    assert template is not None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag])
    compiled = env.from_string(source)
    for messages in CONVERSATIONS.values():
        if template.default_system and not any(m.role == "system" for m in messages):
            messages = [Message("system", template.default_system), *messages]
        expected = compiled.render(messages=hf_messages(messages), add_generation_prompt=True)
        assert template.render(messages, as_generated=False) == expected


def test_an_unknown_chat_template_is_not_guessed() -> None:
    from llava_cli.templates import template_of_checkpoint

    assert template_of_checkpoint("{{ messages[0]['content'] }}") is None
