"""How close `agd collect`'s disk plan is to what the collection really takes.

Collects into a temp folder and compares, before the safety margin: the tensor-only estimate
(bytes per trajectory × trajectories, the plan before issue 17), the plan's estimate now (plus
per-shard conditions, headers, sidecars, manifest and block rounding), and the bytes on disk
(apparent size and blocks allocated).

    python benchmarks/disk_estimate.py --preset tiny-sd --prompts 6 --num-per-prompt 2 --batch-size 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("AGD_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled


def disk_usage(root: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of every file below `root`."""
    files = [p.stat() for p in root.rglob("*") if p.is_file()]
    apparent = sum(s.st_size for s in files)
    allocated = sum(getattr(s, "st_blocks", 0) * 512 or s.st_size for s in files)
    return apparent, allocated


def main() -> None:
    """Collect once, print the estimates next to the real usage."""
    from agd_cli.collect.disk import block_size as _block_size
    from agd_cli.collect.disk import estimate_bytes_per_trajectory, estimate_collection_bytes
    from agd_cli.collect.run import run_collect

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-sd")
    ap.add_argument("--prompts", type=int, default=6, help="distinct prompts")
    ap.add_argument("--num-per-prompt", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("".join(f"prompt number {i}\n" for i in range(a.prompts)))
        s = run_collect(a.preset, prompts=str(prompts), num_per_prompt=a.num_per_prompt,
                        batch_size=a.batch_size, steps=a.steps, out=str(Path(tmp) / "run"))
        n = s["trajectories"]
        est = estimate_bytes_per_trajectory(a.preset, s["steps_per_trajectory"], a.num_per_prompt)
        old = est["bytes"] * n
        new = estimate_collection_bytes(est, n, a.batch_size, _block_size(Path(tmp)))
        apparent, allocated = disk_usage(Path(s["trajectories_dir"]))
    print(f"{a.preset}: {n} trajectories in {s['shards']} shards")
    for label, value in (("tensor-only estimate (before)", old), ("plan estimate (now)", new),
                         ("on disk, apparent", apparent), ("on disk, allocated", allocated)):
        print(f"  {label:<30} {value:>12,d} B  {100 * (value / allocated - 1):+6.1f} % vs allocated")


if __name__ == "__main__":
    main()
