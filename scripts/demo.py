"""The lmforge demo: a real English corpus to a served model, on the CPU.

1. fetch Debian's `fortunes` package (falls back to the sample shipped in tests/data)
2. `lmforge up -d` — the embedded nats-server and the seven services
3. `lmforge run CORPUS --model-name fortune --follow`
4. `lmforge generate --model fortune "..."`
5. per-stage wall time, then `lmforge down` (unless --keep)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
SAMPLE = ROOT / "tests" / "data" / "fortunes-sample.txt"


def fetch_fortunes() -> Path:
    """All of Debian's fortunes in one `%`-separated file, or the shipped sample."""
    corpus = CACHE / "fortunes.txt"
    if corpus.exists():
        return corpus
    CACHE.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["apt-get", "download", "fortunes", "fortunes-min"], cwd=tmp,
                           check=True, capture_output=True, timeout=120)
            for deb in Path(tmp).glob("*.deb"):
                subprocess.run(["dpkg-deb", "-x", str(deb), f"{tmp}/x"], check=True)
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"could not fetch Debian's fortunes ({exc}); using {SAMPLE.name}")
            return SAMPLE
        files = sorted(p for p in Path(tmp, "x/usr/share/games/fortunes").iterdir()
                       if p.is_file() and p.suffix not in (".dat", ".u8")
                       and not p.is_symlink())
        with corpus.open("wb") as out:
            for path in files:
                out.write(path.read_bytes().rstrip(b"\n") + b"\n%\n")
    return corpus


def lmforge(*args: str, env: dict, check: bool = True, capture: bool = False):
    return subprocess.run([sys.executable, "-m", "lmforge.cli.main", *args], env=env,
                          check=check, text=True,
                          capture_output=capture)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="leave lmforge running")
    parser.add_argument("--time-budget", type=float, default=120, help="training seconds")
    args = parser.parse_args()

    started = time.monotonic()
    corpus = fetch_fortunes()
    print(f"corpus: {corpus} ({corpus.stat().st_size / 1e6:.1f} MB)")
    home = ROOT / ".lmforge" / "demo"
    shutil.rmtree(home, ignore_errors=True)
    env = {**os.environ, "LMFORGE_HOME": str(home),
           "LMFORGE_DATA_ROOTS": f"{corpus.parent}{os.pathsep}{SAMPLE.parent}",
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           # The demo serves AWQ int4; should a two-minute model miss the quality gate,
           # it serves fp32 and says why (the run, `lmforge runs` and the log) instead
           # of failing.
           "LMFORGE_QUANTIZER_ON_GATE_FAILURE": os.environ.get(
               "LMFORGE_QUANTIZER_ON_GATE_FAILURE", "serve-fp")}
    lmforge("up", "-d", "--gateway-port", "0", env=env)
    try:
        lmforge("run", str(corpus), "--model-name", "fortune", "--follow",
                "--time-budget", str(args.time_budget), "--timeout", "900", env=env)
        print()
        for prompt in ("The secret of life is", "Computers are"):
            lmforge("generate", "--model", "fortune", "--max-new-tokens", "40",
                    "--temperature", "0.8", "--seed", "7", prompt, env=env)
        runs = json.loads(lmforge("runs", "--json", env=env, capture=True).stdout)
        for run in runs:
            print(f"\nrun {run['run_id']}: {run['status']}, held-out perplexity "
                  f"{run['perplexity']:.1f}, {run['step']} steps")
            print(f"  quantized: {run['quantization']}")
            print(f"  served at: {run['served']}")
            previous = run["started"]
            for stage, done in sorted(run["stage_done_at"].items(), key=lambda kv: kv[1]):
                print(f"  {stage:<18} {done - previous:7.1f} s")
                previous = done
            print(f"  {'pipeline total':<18} {previous - run['started']:7.1f} s")
    finally:
        if not args.keep:
            lmforge("down", env=env, check=False)
    print(f"\ndemo wall time {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
