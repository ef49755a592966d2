"""What the cache's own arithmetic costs per step, module by module: ``python tools/step_costs.py --ops``.

    python tools/module_costs.py --model digits --json docs/results/module_costs_digits.json
    python tools/module_costs.py --model mid --dtype bfloat16 --json docs/results/module_costs_mid_bf16.json

Kept as an entry point for these commands; the code and its description live in tools/step_costs.py.
"""

from __future__ import annotations

from common import run_cli
from step_costs import ops_main

if __name__ == "__main__":
    run_cli(ops_main)
