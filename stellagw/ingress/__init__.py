"""accept + parse + respond: the client-facing HTTP/1.1 side of the gateway."""
