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


STUB = """#!/usr/bin/env bash
# stands in for python: records each call; the benchmark fails as FAILURE says unless given the einsums
echo "$*" >> "$CALLS"
case "$*" in
  *"scripts.benchmark --table"*) exit 0 ;;
  *"scripts.benchmark"*"window_attention=einsum,text_attention=einsum"*) exit 0 ;;
  *"scripts.benchmark"*"--only train_frozen,train_full"*) echo "$FAILURE"; exit 1 ;;
  *) exit 0 ;;
esac
"""


def _run_with_stub(tmp_path, failure: str) -> list[str]:
    import os
    import subprocess

    tmp_path.mkdir()
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    smi = tmp_path / "nvidia-smi"  # says nothing, as on a machine without a GPU: the 40 GiB part is skipped
    smi.write_text("#!/usr/bin/env bash\nexit 1\n")
    smi.chmod(0o755)
    calls = tmp_path / "calls"
    env = {**os.environ, "PYTHON": str(stub), "CALLS": str(calls), "FAILURE": failure,
           "PATH": f"{tmp_path}:/usr/bin:/bin"}
    out = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return [c for c in calls.read_text().splitlines() if "scripts.benchmark" in c and "--table" not in c]


def test_a_failing_flash_kernel_does_not_cost_the_other_rows(tmp_path):
    """Where the train part fails and its log names Pallas or Triton, the train rows run again with the
    einsums within that part's time, and the parts after it run the einsums; any other failure (out of
    memory, say) changes nothing after it."""
    calls = _run_with_stub(tmp_path / "kernel", "jax.errors.JaxRuntimeError: INTERNAL: Triton compilation of pallas_call failed")
    assert [c.split("--json ")[1].split("/")[-1] for c in calls] == ["train.json", "train_einsums.json",
                                                                      "generate.json"]
    assert "--hardware" not in calls[0]
    assert all("--hardware gpu:window_attention=einsum,text_attention=einsum" in c for c in calls[1:])
    calls = _run_with_stub(tmp_path / "memory", "RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
    assert [c.split("--json ")[1].split("/")[-1] for c in calls] == ["train.json", "generate.json"]
    assert not any("--hardware" in c for c in calls)
