"""The vendors' own health tools, read as findings per device: NVIDIA's ``nvidia-smi`` and kernel log, Ascend's
``npu-smi`` and ``hccn_tool``.

On real fleets these show a failing device or link first. Each reader runs the tool when it is on the host
(never blocking more than ``timeout_s``), parses its documented output and returns a :class:`VendorReport`:
findings per device (``fatal``: exclude the device; ``warning``: journal it) and, per tool it could not use,
the reason (absent, not permitted, timed out, unparsable). Output formats, and where they are documented:

- ``nvidia-smi --query-gpu=<fields> --format=csv,noheader,nounits``: one CSV line per GPU, the fields in the
  order asked, ``[N/A]`` where unsupported (``nvidia-smi --help-query-gpu``; the nvidia-smi(1) manual page).
- ``nvidia-smi nvlink --status -i N``: ``GPU N: <name> (UUID: ...)`` then ``Link k: <speed> GB/s`` or
  ``Link k: <inactive>`` per link (nvidia-smi(1), ``nvlink`` subcommand).
- XID errors in the kernel log: ``NVRM: Xid (PCI:0000:18:00): 79, pid=..., GPU has fallen off the bus.``
  (NVIDIA's "XID Errors" guide, which also lists the codes treated as fatal below).
- ``npu-smi info``: a table whose first row per NPU is ``| <NPU> <Name> | <Health> | <Power> <Temp> ... |``;
  Health is one of OK, Warning, Alarm, Critical, UNKNOWN (Ascend npu-smi reference, "npu-smi info").
- ``hccn_tool -i N -link -g``: ``link status: UP`` or ``DOWN``; ``hccn_tool -i N -net_health -g``:
  ``net health status: Success`` (or Init before a detection address is set, else the failure: Socket fail,
  Receive timeout, Unreachable, Time exceeded, Fault) (Ascend hccn_tool reference; MindX DL fault-diagnosis
  guide, "collecting logs before training").
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Severity = Literal["fatal", "warning"]

NVIDIA_FIELDS = (
    "index",
    "uuid",
    "pci.bus_id",
    "ecc.errors.uncorrected.volatile.total",
    "clocks_event_reasons.hw_slowdown",
)
#: XID codes that mean the GPU (or its memory, or its NVLink) can no longer be trusted.
FATAL_XIDS = frozenset({48, 62, 63, 64, 74, 79, 92, 94, 95, 119, 120})
NPU_HEALTH: dict[str, Severity | None] = {
    "OK": None,
    "Warning": "warning",
    "UNKNOWN": "warning",
    "Alarm": "fatal",
    "Critical": "fatal",
}
NET_HEALTH_OK = frozenset({"Success", "Init"})


@dataclass(frozen=True)
class VendorFinding:
    device: int
    tool: str
    severity: Severity
    detail: str


@dataclass(frozen=True)
class VendorReport:
    """What the family's tools said about the devices asked for. Picklable; ``to_dict`` for JSON."""

    findings: tuple[VendorFinding, ...] = ()
    #: Tool → why it was not used (absent on this host, not permitted, timed out, unparsable).
    skipped: dict[str, str] = field(default_factory=dict)
    #: Tools that ran and were read.
    ran: tuple[str, ...] = ()

    @property
    def fatal(self) -> tuple[VendorFinding, ...]:
        return tuple(f for f in self.findings if f.severity == "fatal")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Tools:
    """Runs tools from ``directory`` (else ``PATH``) under a deadline; records what it could not run."""

    def __init__(self, timeout_s: float, directory: str | None) -> None:
        self.timeout_s = timeout_s
        self.directory = directory
        self.skipped: dict[str, str] = {}
        self.ran: list[str] = []

    def run(self, label: str, argv: list[str]) -> str | None:
        executable = shutil.which(argv[0], path=self.directory)
        if executable is None:
            where = self.directory or "PATH"
            self.skipped[label] = f"{argv[0]} not found on {where}"
            return None
        try:
            proc = subprocess.run(
                [executable, *argv[1:]], capture_output=True, text=True, timeout=self.timeout_s, check=False
            )
        except subprocess.TimeoutExpired:
            self.skipped[label] = f"{argv[0]} did not answer within {self.timeout_s:g} s"
            return None
        except OSError as exc:
            self.skipped[label] = f"{argv[0]} could not run: {exc}"
            return None
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
            self.skipped[label] = f"{argv[0]} exited {proc.returncode}: {tail[0][:200]}"
            return None
        self.ran.append(label)
        return proc.stdout

    def report(self, findings: list[VendorFinding]) -> VendorReport:
        return VendorReport(tuple(findings), dict(self.skipped), tuple(self.ran))


def physical_device(local_index: int, visible: str | None) -> int | str:
    """The device the vendor's tools call ``local_index`` of this process: its entry in the visible-devices
    variable (``CUDA_VISIBLE_DEVICES``, ``ASCEND_RT_VISIBLE_DEVICES``; set per worker by Ray), an index or a
    UUID, else ``local_index`` itself. The tools number devices as the host sees them, not the process."""
    entries = [e.strip() for e in (visible or "").split(",") if e.strip()]
    if not 0 <= local_index < len(entries):
        return local_index
    entry = entries[local_index]
    return int(entry) if entry.isdigit() else entry


def search_path(directory: str | None) -> str | None:
    """``directory`` first, then PATH (None: PATH alone)."""
    if directory is None:
        return None
    return os.pathsep.join([directory, os.environ.get("PATH", os.defpath)])


# --- NVIDIA ------------------------------------------------------------------------------------------------
def parse_nvidia_query(text: str) -> dict[int, dict[str, str]]:
    """``nvidia-smi --query-gpu=NVIDIA_FIELDS --format=csv,noheader,nounits`` → index → field → value."""
    rows: dict[int, dict[str, str]] = {}
    for line in text.strip().splitlines():
        values = [v.strip() for v in line.split(",")]
        if len(values) != len(NVIDIA_FIELDS) or not values[0].isdigit():
            raise ValueError(f"nvidia-smi query line {line!r}: expected {len(NVIDIA_FIELDS)} fields")
        rows[int(values[0])] = dict(zip(NVIDIA_FIELDS, values, strict=True))
    return rows


def parse_nvlink_status(text: str) -> dict[int, bool]:
    """``nvidia-smi nvlink --status -i N`` → link → active."""
    return {
        int(m.group(1)): "inactive" not in m.group(2)
        for m in re.finditer(r"^\s*Link (\d+):\s*(.+)$", text, re.MULTILINE)
    }


def _bus_key(address: str) -> str:
    """``00000000:18:00.0`` (nvidia-smi) and ``0000:18:00`` (an Xid line) → ``18:00``."""
    parts = address.lower().split(":")
    return f"{parts[-2]}:{parts[-1].split('.')[0]}" if len(parts) >= 2 else address.lower()


def parse_xids(text: str) -> list[tuple[str, int, str]]:
    """Kernel log → ``(pci bus prefix, xid, message)`` for every ``NVRM: Xid`` line."""
    found = []
    for m in re.finditer(r"NVRM: Xid \(PCI:([0-9a-fA-F:.]+)\): (\d+),\s*(.*)$", text, re.MULTILINE):
        found.append((m.group(1).lower(), int(m.group(2)), m.group(3).strip()))
    return found


def cuda_health(device: int | str, timeout_s: float = 10.0, directory: str | None = None) -> VendorReport:
    """NVIDIA GPU ``device`` (host index or UUID): uncorrectable ECC errors, hardware slowdown, NVLink
    state, fatal XIDs."""
    tools = _Tools(timeout_s, directory)
    findings: list[VendorFinding] = []
    query = f"--query-gpu={','.join(NVIDIA_FIELDS)}"
    out = tools.run("nvidia-smi", ["nvidia-smi", query, "--format=csv,noheader,nounits"])
    bus, row, index = None, None, -1
    if out is not None:
        try:
            rows = parse_nvidia_query(out)
        except ValueError as exc:
            tools.skipped["nvidia-smi"] = str(exc)
            rows = {}
        row = next((r for i, r in rows.items() if device in (i, r["uuid"])), None)
        if row is None and rows:
            tools.skipped["nvidia-smi"] = f"nvidia-smi lists no GPU {device}"
        if row is not None:
            index = int(row["index"])
            bus = row["pci.bus_id"].lower()
            ecc = row["ecc.errors.uncorrected.volatile.total"]
            if ecc.isdigit() and int(ecc) > 0:
                findings.append(
                    VendorFinding(index, "nvidia-smi", "fatal", f"{ecc} uncorrectable ECC errors")
                )
            if row["clocks_event_reasons.hw_slowdown"] == "Active":
                findings.append(VendorFinding(index, "nvidia-smi", "warning", "hardware slowdown active"))
    if row is None:  # nothing to address the other tools' answers with
        for label in ("nvidia-smi nvlink", "kernel log"):
            tools.skipped[label] = f"no index and PCI bus id for GPU {device} from nvidia-smi"
        return tools.report(findings)
    links_out = tools.run("nvidia-smi nvlink", ["nvidia-smi", "nvlink", "--status", "-i", str(index)])
    if links_out is not None:
        links = parse_nvlink_status(links_out)
        down = sorted(k for k, up in links.items() if not up)
        if down and len(down) < len(links):  # some links up and some not: a link has failed
            findings.append(
                VendorFinding(index, "nvidia-smi nvlink", "fatal", f"NVLink links {down} inactive")
            )
    log = tools.run("kernel log", ["dmesg"])
    if log is not None and bus is not None:
        for xid_bus, xid, message in parse_xids(log):
            if _bus_key(xid_bus) == _bus_key(bus):
                severity: Severity = "fatal" if xid in FATAL_XIDS else "warning"
                findings.append(VendorFinding(index, "kernel log", severity, f"Xid {xid}: {message}"))
    return tools.report(findings)


# --- Ascend ------------------------------------------------------------------------------------------------
def parse_npu_smi_info(text: str) -> dict[int, str]:
    """``npu-smi info`` → NPU id → Health (the first row of each NPU's block)."""
    health: dict[int, str] = {}
    for m in re.finditer(
        r"^\|\s*(\d+)\s+\S+\s*\|\s*(OK|Warning|Alarm|Critical|UNKNOWN)\s*\|", text, re.MULTILINE
    ):
        health.setdefault(int(m.group(1)), m.group(2))
    return health


def parse_hccn(text: str, key: str) -> str:
    """``<key>: <value>`` from hccn_tool's answer (``link status``, ``net health status``)."""
    m = re.search(rf"^\s*{re.escape(key)}\s*:\s*(.+?)\s*$", text, re.MULTILINE | re.IGNORECASE)
    if m is None:
        raise ValueError(f"hccn_tool printed no {key!r}: {text.strip()[:200]!r}")
    return m.group(1)


def ascend_health(index: int, timeout_s: float = 10.0, directory: str | None = None) -> VendorReport:
    """Ascend NPU ``index``: device health (npu-smi), link state and network health (hccn_tool)."""
    tools = _Tools(timeout_s, directory)
    findings: list[VendorFinding] = []
    out = tools.run("npu-smi", ["npu-smi", "info"])
    if out is not None:
        state = parse_npu_smi_info(out).get(index)
        severity = NPU_HEALTH.get(state or "")
        if state is None:
            tools.skipped["npu-smi"] = f"npu-smi info lists no NPU {index}"
        elif severity is not None:
            findings.append(VendorFinding(index, "npu-smi", severity, f"health {state}"))
    checks = (
        ("hccn_tool link", "-link", "link status"),
        ("hccn_tool net_health", "-net_health", "net health status"),
    )
    for label, flag, key in checks:
        answer = tools.run(label, ["hccn_tool", "-i", str(index), flag, "-g"])
        if answer is None:
            continue
        try:
            value = parse_hccn(answer, key)
        except ValueError as exc:
            tools.skipped[label] = str(exc)
            continue
        if key == "link status" and value.upper() != "UP":
            findings.append(VendorFinding(index, label, "fatal", f"link {value}"))
        if key == "net health status" and value not in NET_HEALTH_OK:
            findings.append(VendorFinding(index, label, "fatal", f"network health {value}"))
    return tools.report(findings)
