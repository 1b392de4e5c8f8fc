"""The control socket: JSON-RPC 2.0 server, its core methods, and the CLI's client."""
