"""Record what crosses one network interface (run inside a network namespace, as root): who talked to whom,
how many bytes, and whether any of the given plaintext markers appeared in any frame.

    python tests/netns_capture.py IFACE OUT.json STOP_FILE MARKER...

Stops when STOP_FILE exists; writes OUT.json. Used by tests/test_netns.py only.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
from collections import Counter
from pathlib import Path

ETH_P_ALL = 0x0003


def main() -> None:
    iface, out, stop, *markers = sys.argv[1:]
    wanted = [m.encode() for m in markers]
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(ETH_P_ALL))
    sock.bind((iface, 0))
    sock.settimeout(0.5)
    flows: Counter[str] = Counter()
    found: set[str] = set()
    tail = b""  # a marker may straddle two frames
    Path(out).with_suffix(".ready").write_text("")
    while not Path(stop).exists():
        try:
            frame = sock.recv(65535)
        except TimeoutError:
            continue
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            flows["non-ipv4"] += len(frame)
            continue
        ihl = (frame[14] & 0x0F) * 4
        proto = frame[23]
        src, dst = socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34])
        sport, dport = struct.unpack("!HH", frame[14 + ihl : 18 + ihl]) if proto in (6, 17) else (0, 0)
        name = {6: "tcp", 17: "udp"}.get(proto, str(proto))
        server_port = min(sport, dport)
        flows[
            f"{name} {src}<->{dst} port {server_port}" if src < dst else f"{name} {dst}<->{src} port {server_port}"
        ] += len(frame)
        window = tail + frame
        found.update(m.decode() for m in wanted if m in window)
        tail = frame[-256:]
    Path(out).write_text(json.dumps({"flows": dict(flows), "markers_found": sorted(found)}, indent=2))


if __name__ == "__main__":
    main()
