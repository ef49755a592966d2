"""Build a prompt dataset (``datasets`` directory with one ``prompt`` column) from a text file, one prompt a line.

    python tools/make_prompt_dataset.py calibration/prompts/pixart-64.txt calibration/prompts/pixart-64

Recipes of text-conditional models name the output directory in ``condition.prompts``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import run_cli

from qcache.errors import QcacheError  # noqa: E402
from qcache.families.text import read_prompts, save_prompts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("text", help="text file, one prompt a line (blank lines ignored)")
    ap.add_argument("out", help="output directory")
    args = ap.parse_args()
    path = Path(args.text)
    if not path.is_file():
        raise QcacheError(f"text: file not found: {path}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(set(prompts)) != len(prompts):
        raise QcacheError(f"text: {path} lists a prompt twice")
    import datasets

    datasets.disable_progress_bars()
    save_prompts(prompts, args.out)
    print(f"{len(read_prompts(args.out))} prompts -> {args.out}")


if __name__ == "__main__":
    run_cli(main)
