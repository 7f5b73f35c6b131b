"""The OpenAI-compatible API: the wire format (protocol), one exception -> API-error table (errors), the routes and
chat completions from request to response."""
