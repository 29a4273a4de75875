"""What a node holds outside BPF: its underlay, routes, neighbours and FDB, subnet.env,
masquerade rules and sysctls, and the peer each lease becomes."""
