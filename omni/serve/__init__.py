"""`omni serve`: the OpenAI-compatible HTTP API and the web chat page (app.py), the request
formats (schemas.py), the model worker (engine.py) and the command (cli.py)."""
