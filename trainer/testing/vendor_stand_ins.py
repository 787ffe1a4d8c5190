"""STAND-IN vendor health tools for tests: small scripts printing the tools' documented output.

:func:`write_stand_ins` puts ``nvidia-smi``, ``dmesg``, ``npu-smi`` and ``hccn_tool`` into a directory (name it in
``probes.vendor_tools_dir`` or ``--vendor-tools-dir``). Their answers — formats documented as listed in
:mod:`trainer.devices.vendor` — report GPU 1 failing (uncorrectable ECC errors, a hardware slowdown, an
inactive NVLink, an Xid 79 in the kernel log), NPU 0's link down and NPU 2 in alarm; every other device healthy.
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

# nvidia-smi --query-gpu=index,uuid,pci.bus_id,ecc.errors.uncorrected.volatile.total,clocks_event_reasons.hw_slowdown
#            --format=csv,noheader,nounits
NVIDIA_QUERY = (
    "0, GPU-5f3c0b1e-0000-0000-0000-000000000000, 00000000:18:00.0, 0, Not Active\n"
    "1, GPU-5f3c0b1e-0000-0000-0000-000000000001, 00000000:3B:00.0, 2, Active\n"
)
# nvidia-smi nvlink --status -i 1
NVLINK = "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-5f3c0b1e-0000-0000-0000-000000000001)\n\t Link 0: 26.562 GB/s\n\t Link 1: <inactive>\n"
NVLINK_UP = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5f3c0b1e-0000-0000-0000-000000000000)\n\t Link 0: 26.562 GB/s\n\t Link 1: 26.562 GB/s\n"
DMESG = (
    "[  101.2] nvidia-nvlink: Nvlink Core is being initialized\n"
    "[ 4242.7] NVRM: Xid (PCI:0000:3b:00): 79, pid=2231, name=python, GPU has fallen off the bus.\n"
)
# npu-smi info (Ascend npu-smi reference, "npu-smi info"): NPU 2 in Alarm.
NPU_SMI = """\
+--------------------------------------------------------------------------------------------------------+
| npu-smi 25.2.0                                       Version: 25.2.0                                   |
+-------------------------------+-----------------+------------------------------------------------------+
| NPU     Name                  | Health          | Power(W)     Temp(C)           Hugepages-Usage(page) |
| Chip    Device                | Bus-Id          | AICore(%)    Memory-Usage(MB)                        |
+===============================+=================+======================================================+
| 0       910B1                 | OK              | 95.5          43                0    / 0             |
| 0       0                     | 0000:C1:00.0    | 0            3380  / 65536                           |
+===============================+=================+======================================================+
| 1       910B1                 | OK              | 93.1          41                0    / 0             |
| 0       1                     | 0000:01:00.0    | 0            3380  / 65536                           |
+===============================+=================+======================================================+
| 2       910B1                 | Alarm           | 90.0          44                0    / 0             |
| 0       2                     | 0000:C2:00.0    | 0            3380  / 65536                           |
+===============================+=================+======================================================+
"""

STAND_IN = '''#!{python}
"""STAND-IN for {tool}, written by trainer.testing.vendor_stand_ins: prints documented sample output."""
import json, sys, time
answers = json.loads({answers!r})
args = " ".join(sys.argv[1:])
if "{tool}" == "dmesg" and {hang}:
    time.sleep(60)
for pattern, text in answers:
    if pattern in args:
        sys.stdout.write(text)
        sys.exit(0)
sys.stderr.write("stand-in {tool}: no answer for " + repr(args))
sys.exit(2)
'''


def write_tool(directory: Path, name: str, answers: list[tuple[str, str]], hang: bool = False) -> None:
    """An executable ``directory/name`` printing the text of the first ``(pattern, text)`` whose pattern is
    in its arguments (exit 2 when none is); ``hang``: a ``dmesg`` that never answers."""
    path = directory / name
    path.write_text(STAND_IN.format(python=sys.executable, tool=name, answers=json.dumps(answers), hang=hang))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def write_stand_ins(directory: Path) -> Path:
    """A directory of stand-in nvidia-smi, dmesg, npu-smi and hccn_tool (GPU 1: uncorrectable ECC errors;
    NPU 0: link down; NPU 2: alarm)."""
    directory.mkdir(parents=True)
    write_tool(
        directory, "nvidia-smi", [("--query-gpu", NVIDIA_QUERY), ("-i 1", NVLINK), ("-i 0", NVLINK_UP)]
    )
    write_tool(directory, "dmesg", [("", DMESG)])
    write_tool(directory, "npu-smi", [("info", NPU_SMI)])
    health = "net health status: Success\n"
    write_tool(
        directory,
        "hccn_tool",
        [("-i 0 -link", "link status: DOWN\n"), ("-link", "link status: UP\n"), ("-net_health", health)],
    )
    return directory
