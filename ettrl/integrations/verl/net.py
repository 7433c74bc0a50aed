"""Addresses: where this node's actors listen, as Ray places them."""
from __future__ import annotations

import socket


def node_address() -> str:
    """This node's address as Ray knows it (where verl places the replica's actors); loopback outside Ray."""
    import ray
    return ray.util.get_node_ip_address().strip("[]") if ray.is_initialized() else "127.0.0.1"


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
