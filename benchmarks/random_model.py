"""A model with a real architecture and tokenizer and random weights, laid out as a Hugging Face cache entry.

For ``llm_saturation.py --url`` on a machine that cannot download weights: ``transformers serve`` lists and
loads models from the Hugging Face cache, so this writes one there. Throughput depends on the architecture,
the tokenizer and the lengths generated, not on the weights' values; with random weights a model almost never
says its end-of-sequence token, so every call generates its full ``max_tokens`` (which is what a saturation
run wants). Needs torch and transformers (not this project's dependencies)::

    python benchmarks/random_model.py SOURCE HF_CACHE_DIR orchestrator/smollm2-135m-random
    python benchmarks/random_model.py SOURCE HF_CACHE_DIR orchestrator/smollm2-1.7b-random \\
        --set hidden_size=2048 intermediate_size=8192 num_hidden_layers=24 num_attention_heads=32 \\
        num_key_value_heads=32
    python benchmarks/random_model.py MODEL.gguf --save-source DIR   # config and tokenizer only, ~3.5 MB

``SOURCE`` is a folder with a ``config.json`` and tokenizer files (``save_pretrained`` output) or a GGUF file
(its config and tokenizer are read from it, with the ``gguf`` package; its weights are not used). ``--set``
overrides config fields (ints, floats or strings). ``--save-source`` writes the config and tokenizer to a
folder and stops: that folder is what a machine without the GGUF needs.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path


def _value(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main() -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", type=Path, help="folder with config.json and the tokenizer, or a GGUF file")
    p.add_argument("cache", type=Path, nargs="?", help="the Hugging Face hub cache to write into (HF_HUB_CACHE)")
    p.add_argument("repo", nargs="?", help="the model's id, owner/name")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="config overrides")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--save-source", type=Path, metavar="DIR", help="write the config and tokenizer here, and stop")
    args = p.parse_args()

    folder, gguf = (args.source.parent, {"gguf_file": args.source.name}) if args.source.suffix == ".gguf" \
        else (args.source, {})
    config = AutoConfig.from_pretrained(folder, **gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, **gguf)
    if args.save_source:
        config.save_pretrained(args.save_source)
        tokenizer.save_pretrained(args.save_source)
        print(f"{config.model_type} config and tokenizer in {args.save_source}")
        return
    if args.cache is None or args.repo is None:
        p.error("give the cache folder and the model's id (or --save-source)")
    for item in args.set:
        field, _, value = item.partition("=")
        setattr(config, field, _value(value))
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    revision = hashlib.sha1(f"{args.repo}{sorted(args.set)}".encode()).hexdigest()
    entry = args.cache / f"models--{args.repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / revision
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / "main").write_text(revision)
    params = sum(t.numel() for t in model.parameters())
    print(f"{args.repo}: {params / 1e6:.0f}M parameters (random, bf16) in {snapshot} "
          f"({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
