"""Serving: persistent memories and the HTTP service around the editor.

    store.py     `MemoryStore`: namespaces of facts in SQLite + safetensors snapshots, API keys, an owner lock
    engine.py    `LarimarEngine`: encodes facts and answers prompts against a namespace's memory
    service.py   the FastAPI app (OpenAI-compatible completions + a memory API)
"""
