"""Random-weight checkpoints of real shapes for the benchmark: the hub's config and tokenizer files, random weights.

The files come from ../shared/hubmeta (the real config.json, tokenizer, processor and chat template of each hub repo);
the tensor names and shapes from transformers' own model built on the meta device from that config, so both
implementations read every tensor the hub checkpoint has. Weights are normal(0, 0.02) like a fresh init (norm scales
1, biases 0), stored in bfloat16 as on the hub, in shards of at most 2 GB written one at a time (a 7B build never holds
more than one shard in memory).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
HUBMETA_DIRS = (REPO.parent / "shared" / "hubmeta", REPO / "tests" / "data" / "hubmeta")
SHAPES = {  # --shape -> hub repo whose files are used
    "qwen-0.5b": "llava-hf__llava-interleave-qwen-0.5b-hf",
    "llava-7b": "llava-hf__llava-1.5-7b-hf",
}
FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "added_tokens.json",
         "special_tokens_map.json", "preprocessor_config.json", "processor_config.json", "chat_template.json")
SHARD_BYTES = 2 * 1024**3
VERSION = "1"  # bump when the weights written here change, so old builds are rebuilt


def hubmeta(shape: str) -> Path:
    for root in HUBMETA_DIRS:
        if (root / SHAPES[shape] / "tokenizer.json").exists():
            return root / SHAPES[shape]
    raise SystemExit(f"no hub files for {shape}: need {SHAPES[shape]}/tokenizer.json under one of "
                     f"{', '.join(map(str, HUBMETA_DIRS))}")


def _random(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1 and name.endswith("weight"):  # RMSNorm / LayerNorm scales
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def build(shape: str, dest: Path, seed: int = 0) -> Path:
    """Write (once) a random checkpoint of `shape` into dest/<shape>; return the folder."""
    import transformers

    folder = dest / shape
    stamp = folder / ".bench-complete"
    if stamp.exists() and stamp.read_text() == VERSION:
        return folder
    src = hubmeta(shape)
    folder.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, folder / name)
    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = transformers.LlavaForConditionalGeneration(config)
    tied = config.text_config.tie_word_embeddings if hasattr(config.text_config, "tie_word_embeddings") else False
    tied = tied or getattr(config, "tie_word_embeddings", False)
    # transformers 5 in-memory names are the layout transformers 5 writes: our loader reads it as it is.
    params = [(n, p.shape) for n, p in model.state_dict().items() if not (tied and n == "lm_head.weight")]
    gen = torch.Generator().manual_seed(seed)
    shards: list[list[tuple[str, torch.Size]]] = [[]]
    size = 0
    for name, shp in params:
        nbytes = shp.numel() * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += nbytes
    from safetensors.torch import save_file

    weight_map, total = {}, 0
    for i, part in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        print(f"  writing {folder / file}", file=sys.stderr, flush=True)
        tensors = {n: _random(n, s, gen) for n, s in part}
        save_file(tensors, folder / file, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map |= dict.fromkeys(tensors, file)
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    stamp.write_text(VERSION)
    return folder
