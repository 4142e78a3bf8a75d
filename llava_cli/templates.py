"""The prompt-template registry: one small frozen object per model family."""

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from llava_cli.errors import LlavaError, UsageError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One turn of a conversation: who speaks, what they say, how many images come with it."""

    role: str  # "system" | "user" | "assistant"
    text: str
    images: int = 0  # images attached to this message


class Part(NamedTuple):
    """A piece of a rendered prompt: the template's own text, or text someone wrote (`plain`).

    Special-token strings in plain text (a user typing <|im_end|>, an answer holding </s>) are encoded as the
    characters they are, never as the special tokens: they must not end a turn or open a role.
    """

    text: str
    plain: bool


@dataclass(frozen=True)
class Template:
    """A chat format as plain data, equal to what the family's hub chat_template.json renders."""

    name: str
    default_system: str | None  # used when the conversation has no system message
    stop_tokens: tuple[str, ...]  # token strings that end generation
    stop_strings: tuple[str, ...]  # text that ends generation (for formats without a stop token)
    multi_image: bool  # whether the family was trained on several images per prompt
    system_prefix: str
    user_prefix: str
    assistant_prefix: str
    image_text: str  # what each image renders as when the images come before the text
    text_prefix: str  # between the images and the text; hub templates print it even with no image
    turn_end: str
    generation_prompt: str  # opens the assistant turn the model completes
    image_token: str = "<image>"  # the marker users type and the processor expands to image features
    hub_templates: tuple[str, ...] = ()  # sha256 of the hub chat templates this object renders exactly

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True, as_generated: bool = True) -> str:
        """The prompt text for a conversation, with one image token per attached image.

        With `as_generated` an assistant turn is written as the model wrote it after the generation prompt. The
        interleave-qwen hub template puts its text prefix ("\n") in assistant turns too, which the model never
        produced; rendering history as generated keeps a chat's cached tokens valid. False renders as the hub does.
        """
        return "".join(part.text for part in self.render_parts(messages, add_generation_prompt, as_generated))

    def render_parts(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                     as_generated: bool = True) -> list[Part]:
        """render() as parts that tell the template's text from the messages' (see Part); they join to render()."""
        if self.default_system is not None and not any(m.role == "system" for m in messages):
            messages = [Message("system", self.default_system), *messages]
        prefixes = {"system": self.system_prefix, "user": self.user_prefix, "assistant": self.assistant_prefix}
        parts = []
        for message in messages:
            if message.role not in prefixes:
                raise LlavaError(f"unknown message role {message.role!r}; expected one of {', '.join(ROLES)}")
            body = self._body(message)
            if as_generated and message.role == "assistant" and not message.images:
                body = body[1:]  # the text prefix, which the model never wrote
            parts += [Part(prefixes[message.role], False), *body, Part(self.turn_end, False)]
        if add_generation_prompt:
            parts.append(Part(self.generation_prompt, False))
        return [part for part in parts if part.text]

    def _body(self, message: Message) -> list[Part]:
        """Images then text, or the text alone when it places its images with markers.

        Only a user's text places images: `<image>` in a system prompt or an answer is plain text.
        """
        text = clean_text(message.text)[0]
        markers = text.count(self.image_token) if message.role == "user" else 0
        if markers == 0:
            # The hub templates render every image before the text, whatever the order in the content list.
            return [Part(self.image_text * message.images + self.text_prefix, False), Part(text, True)]
        if markers != message.images:
            fix = "give one image per marker, or " + (
                "spell it another way (< image >) to mean the text" if not message.images
                else "no marker to put the images first")
            raise LlavaError(
                f"the prompt has {_count(markers, self.image_token + ' marker')} "
                f"but {_count(message.images, 'image')} {'was' if message.images == 1 else 'were'} given; {fix}"
            )
        pieces = text.split(self.image_token)
        parts = [Part(self.text_prefix, False), Part(pieces[0], True)]
        for piece in pieces[1:]:
            parts += [Part(self.image_token, False), Part(piece, True)]
        return parts


# Control characters other than tab and newline mean nothing to the models and can drive a terminal when text is
# echoed: terminal escape sequences (CSI, OSC) go whole, the rest one by one. Lone surrogates are the bytes of
# command-line arguments or input that were not UTF-8 (Python's surrogateescape); no tokenizer can encode them.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATES = re.compile(r"[\ud800-\udfff]")


def clean_text(text: str) -> tuple[str, list[str]]:
    """Text as the model reads it, and what was changed (for a warning): CRLF -> LF, control characters dropped,
    bytes that were not UTF-8 replaced by U+FFFD."""
    notes = []
    text, bad = _SURROGATES.subn("\ufffd", text)
    if bad:
        notes.append(f"replaced {_count(bad, 'byte')} that {'is' if bad == 1 else 'are'} not UTF-8 with U+FFFD")
    text = text.replace("\r\n", "\n")
    removed = _ESCAPES.findall(text) + _CONTROLS.findall(_ESCAPES.sub("", text))
    if removed:
        text = _CONTROLS.sub("", _ESCAPES.sub("", text))
        shown = sorted({r.encode("unicode_escape").decode() for r in removed})
        notes.append(f"removed {_count(len(removed), 'control code')} ({', '.join(shown[:4])}"
                     f"{', …' if len(shown) > 4 else ''})")
    return text, notes


def user_text(text: str, what: str = "the prompt", warn: Callable[[str], None] = lambda line: None,
              empty_ok: bool = False) -> str:
    """Text as typed or read, checked at the edge: what clean_text changes is told with `warn` (one line).

    Empty or whitespace-only text is a usage error (unless `empty_ok`); a NUL character is refused, as it means
    binary data was read as text.
    """
    if "\x00" in text:
        raise LlavaError(f"{what} holds a NUL character: binary data rather than text?")
    cleaned, notes = clean_text(text)
    if not cleaned.strip() and not empty_ok:
        raise UsageError(f"{what} is empty" + (" once its control characters are removed" if text.strip() else ""))
    if notes:
        warn(f"{what}: {'; '.join(notes)}")
    return cleaned


def _count(n: int, noun: str) -> str:
    """'1 image', '2 images'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        # llava-hf/llava-1.5-7b-hf chat_template.json: `USER: <image>\n{q} ASSISTANT:`; every text ends with a space.
        Template(
            name="llava-1.5",
            default_system=None,
            stop_tokens=("</s>",),
            stop_strings=(),
            multi_image=False,
            system_prefix="",
            user_prefix="USER: ",
            assistant_prefix="ASSISTANT: ",
            image_text="<image>\n",
            text_prefix="",
            turn_end=" ",
            generation_prompt="ASSISTANT:",
            hub_templates=(  # llava-1.5-7b-hf (with generation tags), llava-1.5-13b-hf ("Fix system message")
                "6fef09c05345e88b9f85e80bcb3491003332050750586568bdf91cfa81965d0c",
                "2c2987bf0f184a23cb77c028d94943efb742ade369552733efac4be22398904b",
            ),
        ),
        # llava-hf/vip-llava-7b-hf chat_template.json: `###Human: <image>\n{q}###Assistant:`. The hub template prints
        # system text raw, so the ViP-LLaVA model card's system line goes in as a system message. The format
        # separates turns with "###", so the model writes "###" where its answer ends, often before any </s>.
        Template(
            name="vip-llava",
            default_system=(
                "A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions."
            ),
            stop_tokens=("</s>",),
            stop_strings=("###",),
            multi_image=False,
            system_prefix="",
            user_prefix="###Human: ",
            assistant_prefix="###Assistant: ",
            image_text="<image>\n",
            text_prefix="",
            turn_end="",
            generation_prompt="###Assistant:",
            hub_templates=("116d011832c1b872dc13e48c79dd14c6c450f43b4665cfc2e4d5d86b9cbe4df1",),  # vip-llava-7b-hf
        ),
        # llava-hf/llava-interleave-qwen-0.5b-hf chat_template.json: ChatML, images first, then "\n" + text.
        # Qwen1.5 chat models end a turn with <|im_end|>; <|endoftext|> also ends a document.
        Template(
            name="interleave-qwen",
            default_system=None,
            stop_tokens=("<|im_end|>", "<|endoftext|>"),
            stop_strings=(),
            multi_image=True,
            system_prefix="<|im_start|>system\n",
            user_prefix="<|im_start|>user\n",
            assistant_prefix="<|im_start|>assistant\n",
            image_text="<image>",
            text_prefix="\n",
            turn_end="<|im_end|>\n",
            generation_prompt="<|im_start|>assistant\n",
            hub_templates=("349c5ec420d32641da2ee0fb704139ec59f890f48abf4cffe670685747794323",),  # interleave-qwen-0.5b/7b-hf
        ),
    )
}

# (config model_type, text_config model_type) -> template; None matches any text model.
FAMILIES: dict[tuple[str, str | None], str] = {
    ("vipllava", None): "vip-llava",
    ("llava", "llama"): "llava-1.5",
    ("llava", "mistral"): "llava-1.5",  # BakLLaVA: llava-1.5 recipe on Mistral-7B
    ("llava", "qwen2"): "interleave-qwen",
}


def get_template(name: str) -> Template:
    """The registered template called `name`."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise LlavaError(f"unknown prompt template {name!r}; known templates: {', '.join(TEMPLATES)}") from None


def template_of_checkpoint(chat_template: str) -> Template | None:
    """The registered template that renders a checkpoint's chat template exactly, recognised by its hash."""
    digest = hashlib.sha256(chat_template.encode("utf-8")).hexdigest()
    return next((t for t in TEMPLATES.values() if digest in t.hub_templates), None)


def template_for(model_type: str, text_model_type: str, vision_model_type: str) -> Template:
    """The template of the family a checkpoint's config describes."""
    name = FAMILIES.get((model_type, text_model_type)) or FAMILIES.get((model_type, None))
    if name is None:
        raise LlavaError(
            f"no prompt template for model_type {model_type!r} with a {text_model_type!r} text model and a "
            f"{vision_model_type!r} vision tower; pick one with --template ({', '.join(TEMPLATES)})"
        )
    return TEMPLATES[name]
