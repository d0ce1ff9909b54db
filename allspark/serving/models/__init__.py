"""Python-backend models of the Triton repository (imported by the generated `model.py` shims).

    component.py   one exported graph on onnxruntime (CPU target); batches what Triton queued
    entry.py       a single-pass modality: the in-process `Runtime` over BLS calls to the components
    stream.py      a generation modality (decoupled): the same, streaming one response per token
    bls.py         the `Runtime` backend whose five calls are BLS requests to the component models
    triton.py      helpers shared by the three models (parameters, dtypes, errors per request)
    floor.py       a model that does nothing: `allspark bench serve` times the serving path with it

Nothing here imports `triton_python_backend_utils` at module level, so the package imports (and its
pure parts are tested) outside the server.
"""
