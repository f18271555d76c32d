"""OpenAI-compatible servers of a frozen model: the embedded JAX server (`server`, over the
sampling engine; `python -m trustee_jax.serving`) and the llama.cpp shim (`llamacpp`;
`python -m trustee_jax.serving.llamacpp`). The simulated world's roles reach them over HTTP
only (simulator.client), never by import."""
