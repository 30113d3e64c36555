"""The runtime behind an OpenAI-compatible HTTP server (``vispec-export
serve``) and a Triton model repository (``vispec-export triton-repo``). Needs the
``[serve]`` extra (FastAPI, uvicorn); no torch."""
