"""Serving benchmark (`ridgeline bench serve`): datasets, the streaming client and vLLM's metrics."""
