"""Health probes and (later) aggregation of downstream service health."""
