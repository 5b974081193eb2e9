"""The HTTP door: Ollama's `/api/*` and OpenAI's `/v1/*`, routed to a coordinator or the Ollama pool."""
