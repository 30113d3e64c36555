"""Triton Python-backend model (copied as ``<model>/1/model.py`` by ``triton-repo``): one
``vispec.runtime.Pipeline`` per instance over the artifacts beside this file, replies
streamed as decoupled responses. Runs inside Triton only (``triton_python_backend_utils``)."""
import io
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from PIL import Image

from vispec.runtime.pipeline import Pipeline
from vispec.runtime.sampling import Sampling
from vispec.runtime.streaming import TextStreamer

HERE = Path(__file__).parent


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        backend = config["parameters"]["backend"]["string_value"]
        drafter = HERE / "drafter"
        instances = sum(int(g.get("count", 1)) for g in config.get("instance_group", [{}]))
        self.pipe = Pipeline(HERE / "target", backend=backend,  # instances share the cores
                             drafter_dir=drafter if drafter.is_dir() else None,
                             keep_spinning=None if instances == 1 else False)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._reply(request, sender)
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception as e:  # the request fails, the model keeps serving
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def _reply(self, request, sender):
        def value(name, default):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            return default if tensor is None else tensor.as_numpy().reshape(-1)

        def send(piece):
            text = pb_utils.Tensor("text", np.array([piece.encode()], dtype=np.object_))
            sender.send(pb_utils.InferenceResponse(output_tensors=[text]))

        images = [Image.open(io.BytesIO(bytes(b))).convert("RGB") for b in value("images", [])]
        options = dict(images=images, max_new_tokens=int(value("max_tokens", [64])[0]),
                       draft=bool(value("speculative", [True])[0]),
                       sampling=Sampling(temperature=float(value("temperature", [0.0])[0])))
        streamer = TextStreamer(self.pipe.target.processor.tokenizer, send)
        messages = value("messages", None)
        if messages is not None:
            self.pipe.chat(json.loads(messages[0]), on_tokens=streamer, **options)
        else:
            self.pipe.generate(value("prompt", [b""])[0].decode(), on_tokens=streamer, **options)
        streamer.flush()

    def finalize(self):
        for part in (self.pipe.drafter, self.pipe.target):
            if part is not None:
                part.close()
