"""Stream one request to a Triton model over gRPC and print the text pieces as JSON.
Run by test_triton.py with the Triton venv's Python (tritonclient lives there):

    python triton_client.py HOST:PORT PROMPT MAX_TOKENS [IMAGE_FILE ...]
"""
import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype


def tensor(name, value):
    t = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
    t.set_data_from_numpy(value)
    return t


def main(url, prompt, max_tokens, *images):
    got = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    inputs = [tensor("prompt", np.array([prompt.encode()], dtype=np.object_)),
              tensor("max_tokens", np.array([int(max_tokens)], np.int32)),
              tensor("temperature", np.array([0.0], np.float32))]
    if images:
        files = [open(path, "rb").read() for path in images]
        inputs.append(tensor("images", np.array(files, dtype=np.object_)))
    client.async_stream_infer("vispec", inputs, enable_empty_final_response=True)
    pieces = []
    while True:
        result, error = got.get(timeout=120)
        if error is not None:
            raise SystemExit(f"error: {error}")
        response = result.get_response()
        if response.outputs:
            pieces.append(result.as_numpy("text")[0].decode())
        if response.parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    print(json.dumps(pieces))


if __name__ == "__main__":
    main(*sys.argv[1:])
