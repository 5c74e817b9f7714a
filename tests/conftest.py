import os
import sys
from pathlib import Path

# tests import their shared helpers (harness.py) by module name, also in spawned DDP workers
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
