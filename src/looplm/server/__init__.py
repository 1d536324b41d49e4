"""`looplm serve`: an OpenAI-compatible HTTP server with per-request loop budgets (issue 14).

    app.py          the FastAPI app: endpoints, errors, auth, /health while loading
    protocol.py     request bodies, the OpenAI error shape, the checks that name a bad field
    completions.py  choices → driver → JSON or server-sent events
    driver.py       the one thread that owns and steps the engines (one per kv strategy), in-process
    engine_process.py  the same in a child process of its own (the default of `looplm serve`)
    text.py         incremental detokenizing and stop strings
    metrics.py      Prometheus metrics under `looplm:`
    static/         the playground page served at /

Importing this package imports FastAPI; `import looplm` never does.
"""
