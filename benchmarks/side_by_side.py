"""This heartseg beside an earlier release, in one run: heartseg-bench and single-scan heartseg-infer calls.

The earlier release is installed into a folder of its own (no dependencies; they are this environment's):

    git worktree add /tmp/release <commit>
    pip install --no-deps --no-build-isolation --target /tmp/release-site /tmp/release
    python benchmarks/side_by_side.py --release /tmp/release-site SCANS... [--rounds 2] [--json OUT]

Rounds alternate the two (release, this, release, this, ...) so that the machine's drift falls on both. Each round
runs heartseg-bench on all the scans (2 threads, --repeat 1, the release's and this heartseg's own shipped fp32
model) and times heartseg-infer on the first scan as a user calls it, process start included. Reported: medians
over rounds of the bench's median seconds per scan, its peak RSS, the single call's wall seconds, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THREADS = 2


def _env(site: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if site is not None:
        # Ahead of the editable install of this checkout: `import heartseg` finds the release.
        env["PYTHONPATH"] = str(site) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def bench(site: Path | None, scans: list[Path]) -> dict:
    """heartseg-bench's result for one thread count (2), one timed run per scan."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        subprocess.run([sys.executable, "-m", "heartseg.runtime.cli_bench", *map(str, scans), "--threads",
                        str(THREADS), "--repeat", "1", "--device", "cpu", "--json", str(out)],
                       env=_env(site), check=True, capture_output=True, text=True)
        result = json.loads(out.read_text())
    return result["configs"][0] if "configs" in result else result


def single_call(site: Path | None, scan: Path) -> float:
    """Wall seconds of `heartseg-infer SCAN -o DIR --threads 2` as a new process."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "heartseg.runtime.cli_infer", str(scan), "-o", tmp, "--threads",
                        str(THREADS), "--device", "cpu"], env=_env(site), check=True, capture_output=True)
        return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scans", nargs="+", type=Path)
    parser.add_argument("--release", type=Path, required=True, help="folder the earlier release is installed in")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calls", type=int, default=3, help="single-scan calls per round")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    scans = sorted(p for s in args.scans for p in (sorted(s.glob("*.nii.gz")) if s.is_dir() else [s]))
    found: dict[str, dict[str, list[float]]] = {name: {"median_s": [], "peak_rss_mb": [], "call_s": []}
                                                for name in ("release", "this")}
    for round_ in range(args.rounds):
        for name, site in (("release", args.release), ("this", None)):
            result = bench(site, scans)
            found[name]["median_s"].append(float(result["median_s"]))
            found[name]["peak_rss_mb"].append(float(result["peak_rss_mb"]))
            found[name]["call_s"] += [single_call(site, scans[0]) for _ in range(args.calls)]
            print(f"round {round_ + 1} {name}: median {result['median_s']:.3f} s/scan, peak RSS "
                  f"{result['peak_rss_mb']:.0f} MB, single call {found[name]['call_s'][-1]:.2f} s", flush=True)
    summary = {name: {key: statistics.median(values) for key, values in numbers.items()}
               for name, numbers in found.items()}
    summary["ratio"] = {key: summary["this"][key] / summary["release"][key] for key in summary["this"]}
    for key in ("median_s", "peak_rss_mb", "call_s"):
        print(f"{key:12s} release {summary['release'][key]:8.3f}  this {summary['this'][key]:8.3f}  "
              f"ratio {summary['ratio'][key]:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"scans": [str(s) for s in scans], "threads": THREADS, "rounds": args.rounds,
                                         "runs": found, "summary": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
