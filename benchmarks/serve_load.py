"""Load test of the OpenAI-compatible server: concurrent streaming clients on loopback.

For each worker count, a server (in this process, 127.0.0.1) over fresh pipelines; for plain
and speculative requests (``"speculative": false|true``) at each concurrency, a bounded
number of streaming greedy requests (asyncio + httpx): p50/p95 time to first token,
per-stream and aggregate decode tokens/s, errors, and every reply checked against offline
greedy decoding. Then multi-turn: time to first token of turn 2 when the worker holds the
conversation's cache vs a fresh prefill of the same conversation (another conversation
took the worker in between).

    python benchmarks/serve_load.py --target demo_out/target-onnx \\
        --drafter demo_out/vispec-onnx --json demo_out/serve_load.json
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import sys
import time
from pathlib import Path

SECOND_QUESTION = "What colour is it?"
TEXT_PROMPTS = ("Tell me about a lighthouse.", "What is a volcano?")


def image_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def prompts(n_images: int, text: bool) -> list[tuple[str, list]]:
    """(question, PIL images): held-out synthetic images (the demo's), then text prompts."""
    from vispec.exporter.demo.synthetic_images import QUESTION, examples
    out = [(QUESTION, [e.image]) for e in examples(n_images, 0, "heldout")]
    return out + ([(q, []) for q in TEXT_PROMPTS] if text else [])


def messages(question: str, images: list) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": image_uri(i)}} for i in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": question}]}]


def offline(pipe, conversation: list[dict], images: list, max_tokens: int) -> str:
    """Greedy plain decoding of the conversation from scratch, through the runtime."""
    from vispec.runtime.generate import generate_plain
    hf = [{"role": m["role"], "content": [{"type": "image"} if p["type"] == "image_url" else p
                                          for p in m["content"]]} for m in conversation]
    prompt = pipe.target.glue.prepare_chat(pipe.target.processor, hf, images)
    return generate_plain(pipe.target, prompt, max_tokens).text


async def stream(client, model: str, conversation: list[dict], max_tokens: int,
                 speculative: bool) -> dict:
    """One streaming greedy request: its reply, time to first token, tokens, seconds."""
    body = {"model": model, "messages": conversation, "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "speculative": speculative,
            "stream_options": {"include_usage": True}}
    t0, first, text, usage = time.perf_counter(), None, "", {}
    async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        if reply.status_code != 200:
            return {"error": f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}"}
        async for line in reply.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            usage = chunk.get("usage") and {**chunk["usage"], **chunk["vispec"]} or usage
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    text += choice["delta"]["content"]
    end = time.perf_counter()
    first = first or end
    return {"text": text, "ttft": first - t0, "seconds": end - t0, "decode_s": end - first,
            "tokens": usage.get("completion_tokens", 0), "usage": usage}


async def load(url: str, model: str, cases: list, concurrency: int, requests: int,
               max_tokens: int, speculative: bool) -> dict:
    """``requests`` streams over ``cases`` (conversation, images, expected text), at most
    ``concurrency`` at once."""
    import httpx
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(i):
            conversation, _, expected = cases[i % len(cases)]
            async with gate:
                got = await stream(client, model, conversation, max_tokens, speculative)
            got["correct"] = got.get("text") == expected
            return got

        t0 = time.perf_counter()
        runs = await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - t0
    ok = [r for r in runs if "error" not in r]
    ttft = sorted(r["ttft"] for r in ok) or [0.0]
    decode = [(r["tokens"] - 1) / r["decode_s"] for r in ok if r["tokens"] > 1 and r["decode_s"]]
    return {"requests": requests, "errors": len(runs) - len(ok),
            "wrong": sum(not r["correct"] for r in ok),
            "ttft_p50_s": round(statistics.median(ttft), 4),
            "ttft_p95_s": round(ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))], 4),
            "stream_tok_s": round(statistics.mean(decode), 2) if decode else 0.0,
            "aggregate_tok_s": round(sum(r["tokens"] for r in ok) / wall, 2),
            "tokens_per_pass": round(statistics.mean(r["usage"].get("tokens_per_pass", 0)
                                                     for r in ok), 3) if ok else 0.0,
            "error_messages": sorted({r["error"] for r in runs if "error" in r})[:3]}


async def multi_turn(url: str, model: str, pipe, items: list, max_tokens: int,
                     speculative: bool) -> dict:
    """Turn 2's time to first token with the conversation's cache vs a fresh prefill."""
    import httpx
    reuse, fresh, wrong = [], [], 0
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for question, images in items:
            conversation = messages(question, images)
            first = await stream(client, model, conversation, max_tokens, speculative)
            conversation += [{"role": "assistant", "content": [
                {"type": "text", "text": first["text"]}]},
                {"role": "user", "content": [{"type": "text", "text": SECOND_QUESTION}]}]
            expected = offline(pipe, conversation, images, max_tokens)
            warm = await stream(client, model, conversation, max_tokens, speculative)
            other = messages(TEXT_PROMPTS[0], [])  # takes the worker's cache
            await stream(client, model, other, 4, speculative)
            cold = await stream(client, model, conversation, max_tokens, speculative)
            wrong += (warm["text"] != expected) + (cold["text"] != expected)
            reuse.append((warm["ttft"], warm["usage"]["reused_tokens"]))
            fresh.append((cold["ttft"], cold["usage"]["reused_tokens"]))
    median = lambda pairs, k: statistics.median(p[k] for p in pairs)  # noqa: E731
    return {"turn2_ttft_reuse_s": round(median(reuse, 0), 4),
            "turn2_ttft_fresh_s": round(median(fresh, 0), 4),
            "ratio": round(median(reuse, 0) / median(fresh, 0), 3),
            "reused_tokens": median(reuse, 1), "fresh_reused_tokens": median(fresh, 1),
            "wrong": wrong}


def run(args) -> dict:
    from vispec.runtime.pipeline import Pipeline
    from vispec.runtime.serve.app import Settings
    from vispec.runtime.serve.server import ServerThread

    items = prompts(args.images, args.text)
    reference = Pipeline(args.target, threads=args.threads)
    cases = []
    for question, images in items:
        conversation = messages(question, images)
        cases.append((conversation, images,
                      offline(reference, conversation, images, args.max_tokens)))
    results = {"rows": [], "multi_turn": None}
    for workers in args.workers:
        pipes = [Pipeline(args.target, drafter_dir=args.drafter, threads=args.threads)
                 for _ in range(workers)]
        for pipe in pipes:
            pipe.tree_policy()  # `auto` measures (or reads its cache) before any request
        server = ServerThread(pipes, Settings(model="bench", queue=64))
        try:
            asyncio.run(load(server.url, "bench", cases, 1, len(cases), args.max_tokens, True))
            for speculative in (False, True):
                for concurrency in args.concurrency:
                    row = asyncio.run(load(server.url, "bench", cases, concurrency,
                                           args.repeats * max(concurrency, len(cases)),
                                           args.max_tokens, speculative))
                    row = {"workers": workers, "mode": "speculative" if speculative else "plain",
                           "concurrency": concurrency, **row}
                    results["rows"].append(row)
                    print(format_row(row), file=sys.stderr, flush=True)
            if workers == 1:
                results["multi_turn"] = asyncio.run(multi_turn(
                    server.url, "bench", reference, items[:args.turns], args.max_tokens, True))
                print(f"multi-turn: {results['multi_turn']}", file=sys.stderr, flush=True)
        finally:
            server.stop()
    return results


def format_row(row: dict) -> str:
    return (f"workers {row['workers']} {row['mode']:>11} x{row['concurrency']}: "
            f"TTFT p50 {row['ttft_p50_s']:.3f} s p95 {row['ttft_p95_s']:.3f} s, "
            f"{row['stream_tok_s']:.1f} tok/s per stream, {row['aggregate_tok_s']:.1f} tok/s "
            f"aggregate, {row['tokens_per_pass']:.2f} tokens/pass, errors {row['errors']}, "
            f"wrong {row['wrong']}")


def speedups(rows: list[dict]) -> list[str]:
    """Speculative over plain aggregate tokens/s, per workers and concurrency."""
    plain = {(r["workers"], r["concurrency"]): r["aggregate_tok_s"] for r in rows
             if r["mode"] == "plain"}
    return [f"workers {r['workers']} x{r['concurrency']}: speculative / plain aggregate "
            f"{r['aggregate_tok_s'] / plain[r['workers'], r['concurrency']]:.2f}x"
            for r in rows if r["mode"] == "speculative" and plain.get((r["workers"],
                                                                         r["concurrency"]))]


def ints(value: str) -> list[int]:
    return [int(v) for v in value.split(",")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path, default=Path("demo_out/target-onnx"))
    parser.add_argument("--drafter", type=Path, default=Path("demo_out/vispec-onnx"))
    parser.add_argument("--images", type=int, default=4, help="held-out image prompts")
    parser.add_argument("--text", action="store_true", help="add the demo's text prompts")
    parser.add_argument("--concurrency", type=ints, default=[1, 2, 4])
    parser.add_argument("--workers", type=ints, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2, help="requests per case and setting")
    parser.add_argument("--turns", type=int, default=3, help="conversations of the multi-turn test")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None, help="ORT threads per graph")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from vispec.runtime.cli import hide_torch
    hide_torch()
    results = run(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    for line in speedups(results["rows"]):
        print(line, file=sys.stderr)
    bad = sum(r["errors"] + r["wrong"] for r in results["rows"])
    bad += results["multi_turn"]["wrong"] if results["multi_turn"] else 0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
