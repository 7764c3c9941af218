"""Metrics, JSON logs and (later) traces — kept off the hot path."""
