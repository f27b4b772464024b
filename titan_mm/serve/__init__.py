"""Serving: an OpenAI-compatible /v1/chat/completions and a chat page on the standard library's
HTTP server (server.py), the request format (openai_api.py) and the model behind it (engine.py)."""
