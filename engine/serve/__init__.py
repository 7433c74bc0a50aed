"""An OpenAI-compatible HTTP server for the engine (python -m engine.serve --model NAME_OR_DIR); needs the
`serve` extra (fastapi, uvicorn). See docs/serving.md for the routes and the JSON of every response."""
