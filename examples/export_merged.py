"""Merge a LoRA checkpoint into its base model: a plain Hugging Face folder for transformers and vLLM.

    python examples/export_merged.py outputs/run/checkpoints/step-000030 outputs/run/merged

The checkpoint's `adapter/` folder (peft's format) names its base model; the output holds the
merged weights (W + alpha/r * B A) and the tokenizer. Full fine-tuning checkpoints need no export:
their `model/` folder already is one.
"""

import argparse

from minigrpo.lora import adapter_folder, export_merged


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a LoRA checkpoint folder (step-N/) or its adapter/ folder")
    p.add_argument("out", help="where to write the merged model")
    p.add_argument("--dtype", default="float32", help="dtype of the merged weights (float32, bfloat16)")
    args = p.parse_args()
    folder = adapter_folder(args.checkpoint)
    if folder is None:
        raise SystemExit(f"{args.checkpoint} holds no LoRA adapter (adapter_config.json)")
    print(export_merged(folder, args.out, args.dtype))


if __name__ == "__main__":
    main()
