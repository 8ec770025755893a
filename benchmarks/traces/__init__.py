"""Origin-traffic traces: a generated multi-original corpus, the traces over it, and their runner."""
