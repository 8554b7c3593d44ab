"""This node's view of a multi-node rendezvous, for launch/torchrun.sh (standard library only).

    python launch/node_net.py MASTER_ADDR MASTER_PORT

prints ``NODE_ADDR IS_HOST IFNAME`` on one line:

- NODE_ADDR: the source address of this node's route to MASTER_ADDR, i.e. the address the
  other nodes reach it at (torchrun's default is the host name, which often resolves to a
  loopback address: Debian's /etc/hosts maps it to 127.0.1.1);
- IS_HOST: 1 when MASTER_ADDR is this node's own address (it hosts the rendezvous store),
  else 0; ``-`` for a loopback MASTER_ADDR, where several "nodes" share one machine and
  torchrun settles which one hosts;
- IFNAME: the interface holding NODE_ADDR (for GLOO_SOCKET_IFNAME), ``-`` when unknown
  (IPv6, a loopback MASTER_ADDR, a secondary address).

Exits 2 with one line on stderr when MASTER_ADDR does not resolve or has no route.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
import sys

SIOCGIFADDR = 0x8915  # ioctl: an interface's (primary) IPv4 address


def route_source(master: str, port: int) -> tuple[str, str, int]:
    """(our source address towards ``master``, ``master``'s address, its address family)."""
    family, _, _, _, target = socket.getaddrinfo(master, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect(target)  # UDP: sends nothing, only picks the route and the source address
        return sock.getsockname()[0], target[0], family


def interface_of(addr: str) -> str:
    """The name of the interface whose IPv4 address is ``addr``, or ``-``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode())
            try:
                reply = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, request)
            except OSError:  # no IPv4 address on this interface
                continue
            if socket.inet_ntoa(reply[20:24]) == addr:
                return name
    return "-"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: node_net.py MASTER_ADDR MASTER_PORT", file=sys.stderr)
        return 2
    master, port = argv[0], int(argv[1])
    try:
        mine, target, family = route_source(master, port)
    except OSError as exc:
        print(f"launch/torchrun.sh: MASTER_ADDR={master}: no route ({exc})", file=sys.stderr)
        return 2
    if ipaddress.ip_address(target.split("%")[0]).is_loopback:
        print(mine, "-", "-")
        return 0
    ifname = interface_of(mine) if family == socket.AF_INET else "-"
    print(mine, int(mine == target), ifname)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
