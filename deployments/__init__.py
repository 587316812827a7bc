"""Serving: the OpenAI-compatible Ray Serve app and the command line (Ray is imported lazily)."""
