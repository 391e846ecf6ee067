"""`make bench`: run every benchmark (each prints its figures and writes benchmarks/results/*.json), then
regenerate README.md's results section. The ablation trains three models (~40 min on 2 cores): `--with-ablation`."""

from __future__ import annotations

import subprocess
import sys

SCRIPTS = ["benchmarks/phantom_speed.py", "benchmarks/miner_quality.py", "benchmarks/mining_agreement.py",
           "benchmarks/model_speed.py", "benchmarks/inference_speed.py"]
MODULES = ["benchmarks.quality", "benchmarks.density_probe", "benchmarks.feature_probe",
           "benchmarks.resolution_probe"]


def main() -> int:
    for script in SCRIPTS:
        subprocess.run([sys.executable, script], check=True)
    for module in MODULES + (["benchmarks.ablation"] if "--with-ablation" in sys.argv else []):
        subprocess.run([sys.executable, "-m", module], check=True)
    subprocess.run([sys.executable, "-m", "benchmarks.update_readme"], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
