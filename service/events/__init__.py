"""Outcome events: what users did with ranked items (``POST /events``, the events stream, its consumer)."""
