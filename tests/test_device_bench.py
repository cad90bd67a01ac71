"""scripts/device_bench.sh promises to end within 8 minutes (a device session has 15 in all, and the rerun
needs room): the time limits of its parts, in either mode, add up to less, with room for its start."""

import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "device_bench.sh"
BUDGET_S = 8 * 60
START_S = 20  # nvidia-smi, the version line and the wheels' import check before the first part


def _limits(text: str, call: str) -> dict[str, int]:
    """``{name: limit}`` of every ``call NAME LIMIT ...`` line (``run`` or ``ab``), comments aside."""
    lines = [line.split("#")[0] for line in text.splitlines()]
    return {m[1]: int(m[2]) for line in lines if (m := re.match(rf"\s*(?:\S+=\S+\s+)*{call} (\w+) (\d+)\b", line))}


def test_each_mode_of_the_device_script_fits_in_eight_minutes():
    text = SCRIPT.read_text()
    ab_part, _, main_part = text.partition("\nfi\n# --profile")
    ab = _limits(ab_part, "ab")
    main = _limits(main_part, "run")
    assert {"defaults", "einsum_window", "einsum_text", "einsum_both", "grouped_conv"} <= ab.keys()
    assert {"train", "generate", "train_full_b64"} <= main.keys()
    for mode, limits in (("MODE=ab", ab), ("default", main)):
        assert sum(limits.values()) + START_S <= BUDGET_S, (mode, limits)
