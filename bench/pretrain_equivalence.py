"""How far the distributed pretraining cases are from the independent reference: the numbers behind the
tolerances of tests/test_pretrain_dist.py.

    python bench/pretrain_equivalence.py [--out DIR]    # starts `torchrun --nproc_per_node 2` (about 20 s to minutes)
    python bench/pretrain_equivalence.py --out DIR --reuse   # only compares an earlier launch's DIR

Runs tests/dist/pretrain_cases.py (every case of tests/dist/common.py: ZeRO 0-3 x fp32/bf16 on a small MoE,
a dense model cut 2x1, 2x2, 2x4, 1x1, 1x4 ranks x micro-steps) and prints, per case, its largest
relative error against tests/dist/reference.py in the loss and the pre-clip gradient norm (at step 1
and over all steps), the largest absolute error of an exported parameter, and the parameters' error in
units of how far training moved them. Run it on a tree with a deliberately broken gradient average to
see what the tests' tolerances separate from.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true", help="compare the launch already in --out")
    args = ap.parse_args()
    from safetensors.torch import load_file

    from tests.dist.common import CASES, tokens_dir
    from tests.dist.reference import errors, for_case
    from tests.test_pretrain_dist import free_port

    out = args.out or Path(tempfile.mkdtemp(prefix="kiln-equivalence-"))
    if not args.reuse:
        out.mkdir(parents=True, exist_ok=True)
        tokens_dir(out)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(ROOT / "tests/dist/pretrain_cases.py"), str(out)]  # fmt: skip
        subprocess.run(cmd, env=env, check=True, capture_output=True)
    print(
        f"{'case':12s} {'loss@1':>9s} {'loss':>9s} {'norm@1':>9s} {'norm':>9s} {'param':>9s} {'param/moved':>11s}"
    )
    for case in CASES:
        rows = [json.loads(line) for line in (out / case / "metrics.jsonl").read_text().splitlines()]
        want = for_case(out / "tokens", case)
        e = errors(rows, load_file(out / case / "export" / "model.safetensors"), want)
        print(
            f"{case:12s} {e['loss_1']:9.2e} {e['loss']:9.2e} {e['grad_norm_1']:9.2e} {e['grad_norm']:9.2e} "
            f"{e['param_max']:9.2e} {e['param_rel']:11.2e}"
        )
    print(f"(launch in {out})")


if __name__ == "__main__":
    main()
