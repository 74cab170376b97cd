"""larimar: episodic memory for pretrained language models (Larimar, ICML 2024).

Data flows one way: text -> encoder -> memory -> decoder.

Modules:
    memory      Kanerva-style generative memory (pure torch): write, read, sequential write, forget.
    backbones   loading the encoder / decoder (default: MiniLM + SmolLM2-135M, offline from PyPI packages).
    model       the Larimar model: encoder adapter, decoder conditioned on a memory read-out, loss.
    training    the end-to-end training loop and its config.
    data        text blocks for training; CounterFact / ZsRE loaders.
    scope       the scope detector (sentence encoder + nearest neighbour).
    editing     the user-facing editor: edit / forget / ask / score.
    evaluation  CounterFact / ZsRE / reconstruction evaluation.
    baselines   ROME, MEMIT, GRACE, FT-L, IKE under one method contract.
    store       persistent memories (SQLite + safetensors).
    service     the HTTP service.
    cli         the `larimar` command.
"""

__version__ = "0.1.0"
