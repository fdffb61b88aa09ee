import sys
from pathlib import Path

# `pytest benchmarks` from the repo root: make `import benchmarks.common` and `import kdops` resolve there.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
