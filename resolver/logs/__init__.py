"""Log lines for people and journald: the event format, the handler set-up, the rate limiter."""
