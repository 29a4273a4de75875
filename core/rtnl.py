"""Routing-netlink values the node and the loader both program the kernel with.

They are the kernel's own (linux/rtnetlink.h, linux/neighbour.h): the main routing
table, the notifications the pod scan follows, and the neighbour states a caller sets or
must tell apart.
"""

MAIN_TABLE = 254  # RT_TABLE_MAIN

AF_BRIDGE = 7  # a neighbour of this family is a bridge's forwarding entry

# Notification groups and message types (linux/rtnetlink.h).
RTMGRP_LINK = 0x1
RTMGRP_NEIGH = 0x4
RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWNEIGH, RTM_DELNEIGH = 28, 29

NUD_NONE = 0
NUD_INCOMPLETE = 0x01
NUD_FAILED = 0x20
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
# REACHABLE | NOARP | PERMANENT | STALE | DELAY | PROBE (include/net/neighbour.h)
NUD_VALID = 0xDE
