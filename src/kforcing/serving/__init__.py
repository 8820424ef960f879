"""`kforcing serve`: an OpenAI-compatible HTTP server that batches concurrent requests
(docs/SERVING.md). Its modules need the `serve` extra (fastapi, uvicorn, openai), except
config.py."""
