"""Make the training data the recipes name, from the published data sets (downloaded by you;
nothing is fetched here), as our JSON lines. See megatron_rpg/data/prepare.py.

    python tools/prepare_data.py dapo --source dapo.parquet --out data/dapo_math_17k_en.jsonl
    python tools/prepare_data.py gsm8k --source train.jsonl --out data/gsm8k_train.jsonl
    python tools/prepare_data.py dapo  --source ... --out ... --all-languages   # keep CJK problems
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_rpg.data.prepare import dapo_records, gsm8k_records, write_jsonl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=["dapo", "gsm8k"])
    parser.add_argument("--source", required=True, type=Path, help=".jsonl or .parquet")
    parser.add_argument("--out", required=True, type=Path, help="JSON lines to write")
    parser.add_argument("--all-languages", action="store_true", help="dapo: no English filter")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    try:
        if args.dataset == "dapo":
            records = dapo_records(args.source, english=not args.all_languages)
        else:
            records = gsm8k_records(args.source)
        write_jsonl(records, args.out, args.force)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        sys.stderr.write(f"prepare_data: {err}\n")
        return 1
    sys.stdout.write(f"wrote {len(records)} problems to {args.out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
