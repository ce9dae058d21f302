"""Convert a GGUF model into a Hugging Face folder (bfloat16 weights and the tokenizer) for engines that need one
(vLLM, `transformers serve`). Runs in the engines' venv (`make engines`), which has torch and transformers:

    .venv-engines/bin/python tools/engines/convert_gguf.py GGUF_FILE OUT_DIR

The weights are dequantized from the GGUF (Q4_1 for the packaged SmolLM2), so engines serving the folder run
close to, not exactly, what llama.cpp runs from the GGUF itself.
"""

from __future__ import annotations

import sys
from pathlib import Path


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the GGUF's: the saved weights are plain bf16
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    # Without it `transformers serve` decodes greedily whatever temperature a request asks for (every sample alike)
    model.generation_config.do_sample = True
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    gguf, out = Path(argv[0]), Path(argv[1])
    if (out / "config.json").exists():
        print(f"{out} exists: nothing to do")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    convert(gguf, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
