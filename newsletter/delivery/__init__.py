"""Delivery: SMTP connections, the send engine, and the built-in capture server."""
