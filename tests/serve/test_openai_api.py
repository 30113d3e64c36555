"""The OpenAI-compatible server answered by the official openai client (and raw HTTP for
what the client will not send): exact greedy replies, streaming, images, concurrency,
disconnects, the queue, multi-turn cache reuse and every bad request."""
import base64
import io
import json
import threading

import httpx
import numpy as np
import openai
import pytest

from vispec.runtime.generate import generate_plain
from vispec.runtime.pipeline import load_image

QUESTION = "Describe the red boat and what is around it."


def data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def client(running, **kwargs):
    return openai.OpenAI(base_url=f"{running.url}/v1", api_key=kwargs.pop("api_key", "none"),
                         max_retries=0, timeout=60, **kwargs)


def user(text, images=()):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(i)}}
                                        for i in images] + [{"type": "text", "text": text}]}


def reference(running, messages, images, max_tokens):
    """Greedy plain decoding from scratch on the conversation, through the runtime."""
    target = running.pipelines[0].target
    hf = [{"role": m["role"], "content": [{"type": "image"} if p["type"] == "image_url" else p
                                          for p in m["content"]]} for m in messages]
    prompt = target.glue.prepare_chat(target.processor, hf, [load_image(i) for i in images])
    return generate_plain(target, prompt, max_tokens)


def test_greedy_replies_equal_the_pipeline_streamed_or_not_with_an_image(serve, noise_image):
    running = serve()
    image = noise_image(56, 56, 3)
    messages = [user(QUESTION, [image])]
    want = reference(running, messages, [image], 16)
    api = client(running)
    reply = api.chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                        temperature=0)
    assert reply.choices[0].message.content == want.text
    assert reply.usage.completion_tokens == len(want.tokens)
    assert reply.choices[0].finish_reason in ("stop", "length")
    stats = reply.model_extra["vispec"]
    assert stats["speculative"] and stats["target_passes"] <= len(want.tokens)
    chunks = list(api.chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                              temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.tokens)
    plain = api.chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                        temperature=0, extra_body={"speculative": False})
    assert plain.choices[0].message.content == want.text
    assert not plain.model_extra["vispec"]["speculative"]
    assert [m.id for m in api.models.list().data] == ["tiny"]


def test_turn_2_reuses_the_cache_and_equals_the_reply_from_scratch(serve, noise_image):
    running = serve()
    api = client(running)
    image = noise_image(56, 56, 3)
    messages = [user(QUESTION, [image])]
    first = api.chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                        temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 user("And the sea?")]
    second = api.chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                         temperature=0)
    hf = [m if m["role"] != "assistant" else
          {"role": "assistant", "content": [{"type": "text", "text": m["content"]}]}
          for m in messages]
    assert second.choices[0].message.content == reference(running, hf, [image], 12).text
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens - 1 <= cached < second.usage.prompt_tokens
    assert second.model_extra["vispec"]["reused_tokens"] == cached


def test_eight_concurrent_clients_are_each_answered_once_and_right(serve):
    running = serve(workers=2, queue=8)
    questions = [f"Tell me about the {w} boat." for w in
                 ("red", "blue", "green", "old", "small", "tall", "white", "black")]
    wants = [reference(running, [user(q)], [], 12).text for q in questions]
    got, errors = {}, []

    def ask(i):
        try:
            stream = client(running).chat.completions.create(
                model="tiny", messages=[user(questions[i])], max_tokens=12, temperature=0,
                stream=True)
            ids, text = set(), ""
            for chunk in stream:
                ids.add(chunk.id)
                text += chunk.choices[0].delta.content or ""
            got.setdefault(i, []).append((ids, text))
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert sorted(got) == list(range(8)) and all(len(v) == 1 for v in got.values())
    assert [got[i][0][1] for i in range(8)] == wants
    assert len({next(iter(got[i][0][0])) for i in range(8)}) == 8  # one completion id each


def test_a_client_that_leaves_mid_stream_frees_the_worker(serve):
    running = serve(queue=0)
    body = {"model": "tiny", "messages": [user("Tell me a long story.")], "max_tokens": 200,
            "temperature": 0, "stream": True, "speculative": False}
    with httpx.Client(base_url=running.url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # the first chunk came: the generation runs
        for _ in range(200):  # the worker is freed at the next pass
            if http.get("/health").json()["busy"] == 0:
                break
            threading.Event().wait(0.05)
        session = running.pipelines[0].session
        assert len(session.rows) < 180 + 20  # cancelled early: far fewer than 200 decoded
        reply = client(running).chat.completions.create(
            model="tiny", messages=[user(QUESTION)], max_tokens=8, temperature=0)
        assert reply.choices[0].message.content == reference(running, [user(QUESTION)], [], 8).text


def test_a_full_queue_answers_429_with_retry_after(serve):
    running = serve(queue=0)
    pool = running.app.state.pool
    prompt = running.pipelines[0].target.prepare("hold the worker")

    async def hold():
        return await pool.acquire(prompt)

    worker = running.call(hold)  # what an in-flight request holds
    with httpx.Client(base_url=running.url, timeout=60) as http:
        body = {"model": "tiny", "messages": [user(QUESTION)], "max_tokens": 4}
        refused = http.post("/v1/chat/completions", json=body)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"

        async def release():
            pool.release(worker)

        running.call(release)
        assert http.post("/v1/chat/completions", json=body).status_code == 200


def bad_requests(noise_image):
    good = {"model": "tiny", "messages": [user(QUESTION)], "max_tokens": 4}
    image = {"type": "image_url", "image_url": {"url": data_uri(noise_image())}}
    return {
        "malformed JSON": (b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
        "not an object": (b"[1, 2]", 400, "JSON object"),
        "unknown model": ({**good, "model": "gpt-9"}, 404, "'tiny'"),
        "prompt too long": ({**good, "messages": [user("boat " * 400)]}, 400, "max_len"),
        "too many images": ({**good, "messages": [{"role": "user", "content": [image] * 5 + [
            {"type": "text", "text": "hi"}]}]}, 400, "image"),
        "bad image bytes": ({**good, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]},
            400, "cannot decode"),
        "image URL": ({**good, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]},
            400, "data: URI"),
        "local image path": ({**good, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "/etc/hostname"}}]}]}, 400,
            "--allow-local-images"),
        "unsupported parameter": ({**good, "logprobs": True}, 400, "'logprobs'"),
        "n > 1": ({**good, "n": 2}, 400, "n must be 1"),
        "bad temperature": ({**good, "temperature": -1}, 400, "temperature"),
        "no messages": ({**good, "messages": []}, 400, "must end with a user"),
        "bad role": ({**good, "messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
        "zero max_tokens": ({**good, "max_tokens": 0}, 400, "max_tokens must be >= 1"),
    }


def test_every_bad_request_gets_a_4xx_openai_error_and_the_server_goes_on(serve, noise_image):
    running = serve()
    with httpx.Client(base_url=running.url, timeout=60) as http:
        for name, (body, status, says) in bad_requests(noise_image).items():
            if isinstance(body, bytes):
                response = http.post("/v1/chat/completions", content=body,
                                     headers={"content-type": "application/json"})
            else:
                response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == status, (name, response.text)
            error = response.json()["error"]
            assert says in error["message"] and error["type"], (name, error)
        for method, path, status in (("GET", "/v1/nothing", 404),
                                     ("GET", "/v1/chat/completions", 405)):
            response = http.request(method, path)
            assert response.status_code == status and "error" in response.json()
        reply = http.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [user(QUESTION)], "max_tokens": 4, "temperature": 0})
        assert reply.status_code == 200
        assert reply.json()["choices"][0]["message"]["content"] == \
            reference(running, [user(QUESTION)], [], 4).text


def test_the_api_key_is_required_when_set(serve):
    running = serve(api_key="secret")
    with pytest.raises(openai.AuthenticationError, match="API key"):
        client(running, api_key="wrong").models.list()
    assert [m.id for m in client(running, api_key="secret").models.list().data] == ["tiny"]
    assert httpx.get(f"{running.url}/health").status_code == 200  # health stays open


def test_stop_strings_end_the_reply_before_them(serve):
    running = serve(kind=None)
    want = reference(running, [user(QUESTION)], [], 24).text
    stop = want[len(want) // 2: len(want) // 2 + 2]
    reply = client(running).chat.completions.create(
        model="tiny", messages=[user(QUESTION)], max_tokens=24, temperature=0, stop=[stop])
    assert reply.choices[0].message.content == want[:want.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_sampling_with_a_seed_repeats(serve):
    running = serve()
    api = client(running)
    texts = [api.chat.completions.create(model="tiny", messages=[user(QUESTION)], max_tokens=12,
                                         temperature=0.8, top_p=0.9, seed=7)
             .choices[0].message.content for _ in range(2)]
    assert texts[0] == texts[1]
    assert np.unique(texts).size == 1 and json.dumps(texts)
