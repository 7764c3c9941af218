"""Routing: the table of registered endpoints (over the radix router), instances, selection."""
