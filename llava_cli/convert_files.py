"""The small files of a converted checkpoint that the llava-hf repos carry: processor, generation, chat template.

The chat templates are those of the llava-hf repos, byte for byte, so `llava ask` (and transformers) recognise them.
"""

from __future__ import annotations

from typing import Any

from .config import LlavaConfig

_IMAGES_FIRST = ("{# Render all images first #}"
                 "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}")
_TEXTS = "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
CHAT_TEMPLATES: dict[str, str] = {
    # llava-hf/llava-1.5-7b-hf chat_template.json
    "llava-1.5": (
        "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
        "{% endif %}" + _IMAGES_FIRST + "{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
        "{% if message['role'] != 'assistant' %}" + _TEXTS + "{{ content['text'] + ' '}}{% endfor %}{% else %}"
        + _TEXTS + "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    # llava-hf/vip-llava-7b-hf chat_template.json
    "vip-llava": (
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ '###Human: '}}"
        "{% elif message['role'] == 'assistant' %}{{ '###' + message['role'].title() + ': '}}{% endif %}"
        + _IMAGES_FIRST + "{{ '<image>\n' }}{% endfor %}{# Render all text next #}" + _TEXTS
        + "{{ content['text'] }}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ '###Assistant:' }}{% endif %}"
    ),
    # llava-hf/llava-interleave-qwen-0.5b-hf and -7b-hf chat_template.json
    "interleave-qwen": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}" + _IMAGES_FIRST
        + "{{ '<image>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}" + _TEXTS
        + "{{ '\n' + content['text'] }}{% endfor %}{% else %}" + _TEXTS + "{% generation %}{{ '\n' + content['text'] }}"
        "{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}

_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def preprocessor_config(cfg: LlavaConfig) -> dict[str, Any]:
    """preprocessor_config.json as the llava-hf repos have it: CLIP's resize and crop, or SigLIP's resize."""
    size = cfg.vision.image_size
    common = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
              "processor_class": "LlavaProcessor", "resample": 3, "rescale_factor": 1 / 255}
    if cfg.vision.model_type == "siglip_vision_model":
        return common | {"image_processor_type": "SiglipImageProcessor", "image_mean": [0.5] * 3,
                         "image_std": [0.5] * 3, "size": {"height": size, "width": size}}
    return common | {"image_processor_type": "CLIPImageProcessor", "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD,
                     "do_center_crop": True, "crop_size": {"height": size, "width": size},
                     "size": {"shortest_edge": size}}


def processor_config(cfg: LlavaConfig) -> dict[str, Any]:
    """processor_config.json: what transformers' LlavaProcessor needs to count image tokens."""
    return {"image_token": "<image>", "num_additional_image_tokens": int(cfg.vision.class_token),
            "patch_size": cfg.vision.patch_size, "processor_class": "LlavaProcessor",
            "vision_feature_select_strategy": cfg.select_strategy}


def generation_config(bos: int | None, eos: int | list[int] | None, pad: int | None) -> dict[str, Any]:
    ids = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    return {"_from_model_config": True} | {k: v for k, v in ids.items() if v is not None}
