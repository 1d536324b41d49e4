"""`looplm serve`: an OpenAI-compatible HTTP server with per-request loop budgets (issue 14).

    app.py          the FastAPI app: endpoints, errors, auth, /health while loading
    protocol.py     request bodies, the OpenAI error shape, the checks that name a bad field
    completions.py  choices → driver → JSON or server-sent events
    driver.py       the engines' loop (one engine per kv strategy), the server's side of it (admission,
                    delivery), and `Driver`: the loop in a thread of this process
    engine_process.py  the same loop in a child process of its own (the default of `looplm serve`)
    text.py         incremental detokenizing and stop strings
    metrics.py      Prometheus metrics under `looplm:`
    static/         the playground page served at /

Importing this package imports FastAPI; `import looplm` never does.
"""
