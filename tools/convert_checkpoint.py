"""HF <-> Megatron checkpoint conversion; the same as `megatron-rpg convert`.

python tools/convert_checkpoint.py hf-to-mcore --hf Qwen3-4B --out ckpt --tp 2 --pp 2
python tools/convert_checkpoint.py reshard --ckpt ckpt --out ckpt_tp1 --tp 1
python tools/convert_checkpoint.py mcore-to-hf --ckpt ckpt --out Qwen3-4B-rpg
"""

import sys

from megatron_rpg.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["convert", *sys.argv[1:]]))
