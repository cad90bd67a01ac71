"""Write tests/data/configs_resolved.json and first_losses.json from the code as it is (see
tests/test_configs_resolved.py): ``python tests/data/make_config_goldens.py [--resolved-only]``."""

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.chdir(ROOT)
import conftest  # noqa: E402,F401  - the test suite's devices and environment
from test_configs_resolved import CONFIGS, GOLDEN, LOSSES, first_losses, loss_runs, resolved  # noqa: E402

GOLDEN.write_text(json.dumps({name: resolved(name) for name in CONFIGS}, indent=1, sort_keys=True) + "\n")
print(f"wrote {GOLDEN}")
if "--resolved-only" not in sys.argv:
    losses = {}
    for name, argv in loss_runs().items():
        with tempfile.TemporaryDirectory() as tmp:
            losses[name] = first_losses(argv, Path(tmp))
    LOSSES.write_text(json.dumps(losses, indent=1) + "\n")
    print(f"wrote {LOSSES}: {losses}")
