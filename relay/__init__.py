"""lpd-relay: a store-and-forward relay for the Line Printer Daemon protocol (RFC 1179)."""

__version__ = "0.1.0"
