"""Teacher-forced top-1 agreement of exported targets (e.g. quantized) with a reference export
(float32) of the same model: how often each picks the reference's next token along the
reference's own greedy answers (RESULTS.md: int4 forms).

    python benchmarks/agreement.py REFERENCE ARTIFACTS [ARTIFACTS ...] [--tokens 48]
        [--images 8]

Prompts: distill-data's held-out chat prompts (``HELD_OUT_CHAT``) and held-out synthetic
images asked the short question (the demo's SmolLM2 LLaVA target). The reference answers
each greedily; every other export then runs one prefill over prompt + answer
(``runtime.ties.teacher_forced_logits``) and its argmax per position is compared with the
answer's next token. Prints the mean per group. An ONNX Runtime GenAI model folder (one with
``genai_config.json``, e.g. peers.py's ``peer-int4``) among ARTIFACTS is run the same way on
the same token ids, chat prompts only (it has no vision).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference")
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from vispec.exporter.demo.synthetic_images import QUESTION, examples
    from vispec.exporter.drafters.distill import HELD_OUT_CHAT
    from vispec.runtime.generate import generate_plain
    from vispec.runtime.target import TargetModel
    from vispec.runtime.ties import teacher_forced_logits

    reference = TargetModel(args.reference, threads=args.threads)
    cases = [("chat", text, []) for text in HELD_OUT_CHAT]
    cases += [("image", QUESTION, [e.image]) for e in examples(args.images, 11, "heldout")]
    answers = []
    for group, text, images in cases:
        prompt = reference.prepare(text, images)
        answers.append((group, prompt, generate_plain(reference, prompt, args.tokens).tokens))
    for path in args.artifacts:
        peer = PeerForward(Path(path), args.threads) if (Path(path) / "genai_config.json").exists() \
            else None
        target = None if peer else TargetModel(path, threads=args.threads)
        agreement: dict[str, list[float]] = {}
        for group, prompt, answer in answers:
            if peer and prompt.images:
                continue
            logits = (peer.logits(prompt.input_ids, answer) if peer
                      else teacher_forced_logits(target, prompt, answer))
            chosen = logits.argmax(-1)
            agreement.setdefault(group, []).append(float(np.mean(chosen == np.array(answer))))
        print(path, ", ".join(f"{g} {np.mean(v):.3f} ({len(v)} prompts)"
                              for g, v in agreement.items()), flush=True)
        if target is not None:
            target.close()


class PeerForward:
    """An ORT GenAI folder's ``model.onnx``, run over a whole sequence from an empty past."""

    def __init__(self, folder: Path, threads: int):
        import onnxruntime as ort

        decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        self.past = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]),
                             np.float32)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])

    def logits(self, ids: np.ndarray, answer: list[int]) -> np.ndarray:
        """The logits ``[len(answer), V]`` that choose each token of ``answer`` after prompt
        ``ids``: one pass over prompt + answer."""
        tokens = np.array([[*ids.tolist(), *answer[:-1]]], np.int64)
        feeds = {"input_ids": tokens, "attention_mask": np.ones_like(tokens)}
        feeds.update({arg.name: self.past for arg in self.session.get_inputs()
                      if arg.name.startswith("past_key_values")})
        return self.session.run(["logits"], feeds)[0][0, len(ids) - 1:]

if __name__ == "__main__":
    main()
