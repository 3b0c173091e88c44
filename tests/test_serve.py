"""Tests of serve.py: the API end to end with FastAPI's TestClient (good clips, every bad input,
the limits, the queue, jobs, cancellation, concurrent clients), a real uvicorn server for client
disconnects and for schemathesis over the OpenAPI spec, and the command line's start-up errors.

A tiny random generator (test_inference's) stands in for the trained model; a subclass of
SuperResolver counts, delays or holds its passes (through upsample's public progress hook) where
a test needs work in flight.
"""

import concurrent.futures
import contextlib
import io
import json
import os
import re
import socket
import threading
import time

import numpy as np
import pytest
import schemathesis
import soundfile as sf
import torch
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import serve
from inference_wav import SuperResolver
from models import load_generator
from test_inference import band_limit, save_g, tiny_generator

TIMEOUT = 60  # seconds any wait in these tests may take on a loaded 2-core machine


class CountingResolver(SuperResolver):
    """Counts the passes that upsample reports; after each it waits for `gate` (set by
    default), then `delay` seconds."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.passes = 0
        self.delay = 0.0
        self.gate = threading.Event()
        self.gate.set()

    def upsample(self, audio, sr, input_sr=None, keep_lowband=True, progress=None, **kwargs):
        def counted(fraction):
            self.passes += 1
            assert self.gate.wait(TIMEOUT)
            time.sleep(self.delay)
            if progress is not None:
                progress(fraction)

        return super().upsample(audio, sr, input_sr, keep_lowband, progress=counted, **kwargs)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_g(tmp_path_factory.mktemp("ckpt") / "g_00000000", *tiny_generator())


def counting_resolver(ckpt, seconds_per_pass):
    generator, cfg, _ = load_generator(ckpt)
    return CountingResolver(generator, cfg, torch.device("cpu"), seconds_per_pass)


@pytest.fixture
def resolver(ckpt):
    return counting_resolver(ckpt, 10.0)


@pytest.fixture
def chunked(ckpt):
    """Many short passes: about 50 per second of audio."""
    return counting_resolver(ckpt, 0.02)


@contextlib.contextmanager
def client_for(resolver, **limits):
    with TestClient(serve.create_app(resolver, serve.Limits(**limits))) as client:
        yield client


@contextlib.contextmanager
def real_server(resolver, **limits):
    """serve.py's app under uvicorn in a thread, on a free local port; yields (url, app)."""
    app = serve.create_app(resolver, serve.Limits(**limits))
    sock = serve.listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()


def wait_until(condition, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def clip(seconds=0.25, sr=8000, channels=None, seed=0, level=0.1):
    """Band-limited noise at `sr`: [T] or [channels, T] float32."""
    rng = np.random.default_rng(seed)
    shape = (int(seconds * sr),) if channels is None else (channels, int(seconds * sr))
    return (level * rng.standard_normal(shape)).astype(np.float32)


def wav_bytes(audio, sr, subtype="FLOAT"):
    buffer = io.BytesIO()
    sf.write(buffer, np.asarray(audio).T, sr, subtype=subtype, format="WAV")
    return buffer.getvalue()


def upload(data, name="clip.wav", **options):
    return {"files": {"file": (name, data, "audio/wav")}, "data": options}


def decode(response):
    audio, sr = sf.read(io.BytesIO(response.content), dtype="float32", always_2d=True)
    return audio.T, sr


def assert_error(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]
    assert "Traceback" not in body["error"] and "/tmp" not in body["error"]
    return body["error"]


def finish(client, job_id):
    """Polls a job until it ends; returns (final status, progress values seen)."""
    seen = []

    def ended():
        status = client.get(f"/v1/jobs/{job_id}").json()
        seen.append(status["progress"])
        return status["state"] in ("done", "failed", "cancelled")

    wait_until(ended)
    return client.get(f"/v1/jobs/{job_id}").json(), seen


# --- the progress hook serve.py relies on ---------------------------------------------------


def test_upsample_reports_progress_and_stops_when_the_hook_raises(ckpt):
    generator, cfg, _ = load_generator(ckpt)
    plain = SuperResolver(generator, cfg, torch.device("cpu"), 0.02)
    audio = clip(0.2, 16000, channels=2)
    expected, _ = plain.upsample(audio, 16000)
    fractions = []
    y, _ = plain.upsample(audio, 16000, progress=fractions.append)
    np.testing.assert_array_equal(y, expected)
    assert len(fractions) > 4
    assert np.all(np.diff(fractions) > 0) and fractions[-1] == 1.0

    class Stop(Exception):
        pass

    calls = []

    def stop(fraction):
        calls.append(fraction)
        raise Stop

    with pytest.raises(Stop):
        plain.upsample(audio, 16000, progress=stop)
    assert len(calls) == 1


# --- /v1/superresolve ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sr, channels, options",
    [
        (8000, None, {}),
        (8000, None, {"keep_lowband": "false"}),
        (44100, 2, {"keep_lowband": "true", "input_sr": "16000"}),
        (16000, None, {"keep_lowband": "true"}),
    ],
)
def test_superresolve_returns_the_apis_result(resolver, sr, channels, options):
    audio = clip(0.25, sr, channels)
    keep = options.get("keep_lowband", "true") == "true"
    input_sr = int(options["input_sr"]) if "input_sr" in options else None
    expected, _ = resolver.upsample(audio, sr, input_sr, keep)
    with client_for(resolver) as client:
        response = client.post(
            "/v1/superresolve",
            **upload(wav_bytes(audio, sr), format="float", **options),
        )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/wav"
    assert "clip_superresolved.wav" in response.headers["content-disposition"]
    y, rate = decode(response)
    assert rate == 48000
    assert y.shape == np.atleast_2d(expected).shape
    assert y.shape[1] == round(audio.shape[-1] * 48000 / sr)
    np.testing.assert_array_equal(y, np.atleast_2d(expected))


def test_the_input_band_is_kept_unless_the_raw_output_is_asked_for(resolver):
    audio = clip(0.25, 8000)
    kept, _ = resolver.upsample(audio, 8000, keep_lowband=True)
    raw, _ = resolver.upsample(audio, 8000, keep_lowband=False)
    # the tiny random model rewrites the band the input has, so the two really differ
    assert np.sqrt(np.mean((kept - raw) ** 2)) > 0.1 * np.sqrt(np.mean(raw**2))
    with client_for(resolver) as client:
        for options, expected in (({}, kept), ({"keep_lowband": "false"}, raw)):
            response = client.post(
                "/v1/superresolve", **upload(wav_bytes(audio, 8000), format="float", **options)
            )
            assert response.status_code == 200, response.text
            np.testing.assert_array_equal(decode(response)[0][0], expected)


def test_superresolve_pcm16_by_default_and_reports_the_bandwidth(resolver):
    audio = band_limit(clip(0.5, 48000, level=0.3), 3800)
    expected, _ = resolver.upsample(audio, 48000)
    with client_for(resolver) as client:
        response = client.post("/v1/superresolve", **upload(wav_bytes(audio, 48000)))
    assert response.status_code == 200, response.text
    assert response.headers["x-input-bandwidth-hz"] == "4000"
    assert sf.info(io.BytesIO(response.content)).subtype == "PCM_16"
    y, _ = decode(response)
    np.testing.assert_allclose(y[0], expected, atol=1.5 / 32768)


def bad_uploads():
    good = wav_bytes(clip(0.25, 8000), 8000, "PCM_16")
    nan = clip(0.25, 8000)
    nan[100] = np.nan
    return {
        "not audio": b"this is not a sound file " * 40,
        "empty file": b"",
        "no frames": wav_bytes(np.zeros(0, np.float32), 8000),
        "truncated": good[: len(good) // 2],
        "silent": wav_bytes(np.zeros(2000, np.float32), 8000),
        "NaN samples": wav_bytes(nan, 8000),
        "too short": wav_bytes(clip(0.002, 8000), 8000),
    }


@pytest.mark.parametrize("kind", bad_uploads())
@pytest.mark.parametrize("path", ["/v1/superresolve", "/v1/jobs"])
def test_bad_audio_is_400_with_a_json_error(resolver, kind, path):
    with client_for(resolver) as client:
        response = client.post(path, **upload(bad_uploads()[kind]))
        if path == "/v1/jobs" and response.status_code == 202:
            # a clip the decoder accepts but the model refuses fails as a job, with the reason
            status, _ = finish(client, response.json()["id"])
            assert status["state"] == "failed" and "too short" in status["error"]
            result = client.get(f"/v1/jobs/{status['id']}/result")
            assert "too short" in assert_error(result, 409)
            return
    assert_error(response, 400)


@pytest.mark.parametrize(
    "request_kwargs, field",
    [
        ({"data": {}}, "file"),
        (upload(b"x", format="mp3"), "format"),
        (upload(b"x", input_sr="16k"), "input_sr"),
        (upload(b"x", keep_lowband="maybe"), "keep_lowband"),
    ],
)
def test_bad_options_are_422_naming_the_field(resolver, request_kwargs, field):
    with client_for(resolver) as client:
        response = client.post("/v1/superresolve", **request_kwargs)
    assert assert_error(response, 422).startswith(field)


def test_input_sr_above_the_files_rate_is_400(resolver):
    with client_for(resolver) as client:
        response = client.post(
            "/v1/superresolve",
            **upload(wav_bytes(clip(), 8000), keep_lowband="true", input_sr="16000"),
        )
    assert "input_sr" in assert_error(response, 400)


def test_size_and_duration_limits_are_413(resolver):
    data = wav_bytes(clip(1.0, 8000), 8000)  # 32 kB, 1 s
    with client_for(resolver, max_upload_bytes=1000, max_seconds=10) as client:
        # declared with Content-Length: refused before the body is read
        declared = client.post(
            "/v1/superresolve", **upload(data + bytes(serve.FORM_OVERHEAD_BYTES))
        )
        assert "limit" in assert_error(declared, 413)
        # streamed without a length: refused once the limit is passed
        boundary = "b0undary"
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            f"Content-Type: audio/wav\r\n\r\n".encode()
            + data
            + bytes(serve.FORM_OVERHEAD_BYTES)
            + f"\r\n--{boundary}--\r\n".encode()
        )
        streamed = client.post(
            "/v1/superresolve",
            content=(body[i : i + 4096] for i in range(0, len(body), 4096)),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
        assert "limit" in assert_error(streamed, 413)
    with client_for(resolver, max_seconds=0.5) as client:
        too_long = client.post("/v1/jobs", **upload(data))
        assert "1.0 s long; the limit is 0.5 s" in assert_error(too_long, 413)
        assert client.get("/healthz").json()["queued"] == 0


def test_a_clip_declared_too_long_is_refused_before_it_is_decoded(resolver, monkeypatch):
    # a small compressed file can hold hours of audio: its header is checked first
    def decode_all(path):
        raise AssertionError("decoded a clip whose header is over the limit")

    monkeypatch.setattr(serve.dataset, "load_audio", decode_all)
    with client_for(resolver, max_seconds=0.5) as client:
        data = wav_bytes(clip(1.0, 8000), 8000, "PCM_16")
        for path in ("/v1/superresolve", "/v1/jobs"):
            assert "the limit is 0.5 s" in assert_error(client.post(path, **upload(data)), 413)


def test_queue_full_is_429_at_once_and_the_queue_drains(resolver):
    resolver.gate.clear()  # the first job holds the worker until the gate opens
    data = wav_bytes(clip(), 8000)
    with client_for(resolver, queue_size=1) as client:
        first = client.post("/v1/jobs", **upload(data)).json()
        wait_until(lambda: client.get("/healthz").json()["running"])
        second = client.post("/v1/jobs", **upload(data))
        assert second.status_code == 202 and second.json()["position"] == 1
        assert "queue full" in assert_error(client.post("/v1/jobs", **upload(data)), 429)
        assert_error(client.post("/v1/superresolve", **upload(data)), 429)
        health = client.get("/healthz").json()
        assert health == {"status": "ok", "queued": 1, "running": True, "streams": 0}
        early = client.get(f"/v1/jobs/{first['id']}/result")
        assert assert_error(early, 409) == "job is running"
        resolver.gate.set()
        for job in (first, second.json()):
            assert finish(client, job["id"])[0]["state"] == "done"


def test_concurrent_clients_each_get_their_own_result(resolver):
    cases = [(8000, None), (16000, 2), (22050, None), (44100, None)]
    inputs = [clip(0.25, sr, channels, seed=i) for i, (sr, channels) in enumerate(cases)]
    expected = [resolver.upsample(x, sr)[0] for x, (sr, _) in zip(inputs, cases)]
    with client_for(resolver, queue_size=len(cases)) as client:

        def post(i):
            data = wav_bytes(inputs[i], cases[i][0])
            return client.post("/v1/superresolve", **upload(data, format="float"))

        with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
            responses = list(pool.map(post, range(len(cases))))
    for response, want in zip(responses, expected):
        assert response.status_code == 200, response.text
        np.testing.assert_array_equal(decode(response)[0], np.atleast_2d(want))


# --- jobs -----------------------------------------------------------------------------------


def test_job_lifecycle(chunked):
    audio = clip(0.3, 16000, seed=3)
    expected, _ = chunked.upsample(audio, 16000)
    chunked.delay = 0.005
    with client_for(chunked) as client:
        created = client.post("/v1/jobs", **upload(wav_bytes(audio, 16000), format="float"))
        assert created.status_code == 202, created.text
        job = created.json()
        assert job["state"] in ("queued", "running")
        assert job["input"] == {
            "name": "clip.wav",
            "sample_rate": 16000,
            "channels": 1,
            "seconds": 0.3,
            "bandwidth_hz": 8000.0,
        }
        status, seen = finish(client, job["id"])
        assert status["state"] == "done" and status["error"] is None
        assert np.all(np.diff(seen) >= 0) and seen[-1] == 1.0
        result = client.get(f"/v1/jobs/{job['id']}/result")
        assert result.headers["content-type"] == "audio/wav"
        np.testing.assert_array_equal(decode(result)[0][0], expected)
        for which in ("input", "output"):
            image = client.get(f"/v1/jobs/{job['id']}/spectrogram/{which}")
            assert image.headers["content-type"] == "image/png"
            assert image.content.startswith(b"\x89PNG\r\n\x1a\n")
        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert_error(client.get(f"/v1/jobs/{job['id']}"), 404)


@pytest.mark.parametrize(
    "method, path",
    [
        ("get", "/v1/jobs/nope"),
        ("get", "/v1/jobs/nope/result"),
        ("get", "/v1/jobs/nope/spectrogram/input"),
        ("delete", "/v1/jobs/nope"),
    ],
)
def test_unknown_job_is_404(resolver, method, path):
    with client_for(resolver) as client:
        assert "no such job" in assert_error(getattr(client, method)(path), 404)


def test_finished_jobs_expire(resolver):
    with client_for(resolver, result_ttl=0.2) as client:
        job = client.post("/v1/jobs", **upload(wav_bytes(clip(), 8000))).json()
        assert finish(client, job["id"])[0]["state"] == "done"
        time.sleep(0.3)
        assert_error(client.get(f"/v1/jobs/{job['id']}/result"), 404)


def test_deleting_a_running_job_stops_its_work(chunked):
    chunked.delay = 0.1  # 50 passes of at least 0.1 s: 5 s of work
    with client_for(chunked) as client:
        job = client.post("/v1/jobs", **upload(wav_bytes(clip(1.0, 8000), 8000))).json()
        wait_until(lambda: chunked.passes >= 2)
        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
        wait_until(lambda: not client.get("/healthz").json()["running"])
        assert chunked.passes < 25  # stopped well before the end
        assert_error(client.get(f"/v1/jobs/{job['id']}"), 404)
        chunked.delay = 0.0
        after = client.post("/v1/jobs", **upload(wav_bytes(clip(), 8000))).json()
        assert finish(client, after["id"])[0]["state"] == "done"


def test_temporary_files_are_removed(resolver):
    with client_for(resolver) as client:
        tmp_dir = client.app.state.service.tmp_dir
        client.post("/v1/superresolve", **upload(wav_bytes(clip(), 8000)))
        client.post("/v1/superresolve", **upload(b"junk"))
        job = client.post("/v1/jobs", **upload(wav_bytes(clip(), 8000))).json()
        finish(client, job["id"])
        assert os.listdir(tmp_dir) == []
    assert not os.path.exists(tmp_dir)


# --- WS /v1/stream -------------------------------------------------------------------------


def stream_through(client, query, blocks):
    """Sends float32 blocks and "end"; returns (the concatenated output, the close code)."""
    with client.websocket_connect(f"/v1/stream?{query}") as ws:
        for block in blocks:
            ws.send_bytes(np.asarray(block, "<f4").tobytes())
        ws.send_text("end")
        out = []
        while (message := ws.receive())["type"] != "websocket.close":
            out.append(np.frombuffer(message["bytes"], "<f4"))
    return np.concatenate(out), message["code"]


@pytest.mark.parametrize(
    "query, gain, lowband_hz",
    [
        ("", 1.0, 4000),  # the input's own band is kept by default
        ("&keep_lowband=false", 1.0, None),
        ("&gain=4&keep_lowband=true", 4.0, 4000),
    ],
)
def test_stream_gives_what_the_stream_processor_gives(resolver, query, gain, lowband_hz):
    audio = clip(0.3, 8000, seed=5)
    blocks = np.array_split(audio, [160, 170, 500, 1700])  # any sizes, an empty one too
    processor = resolver.stream(8000, gain, 1, lowband_hz)
    expected = np.concatenate([processor.process(b) for b in blocks] + [processor.flush()])
    with client_for(resolver) as client:
        y, code = stream_through(client, "sr=8000" + query, blocks)
        assert client.get("/healthz").json()["streams"] == 0
    assert code == 1000 and len(y) == round(len(audio) * 48000 / 8000)
    np.testing.assert_array_equal(y, expected)


def stream_error(client, query, *messages):
    """Opens a stream, sends `messages` (bytes or str); returns (its error, the close code)."""
    with client.websocket_connect(f"/v1/stream?{query}") as ws:
        for message in messages:
            (ws.send_bytes(message) if isinstance(message, bytes) else ws.send_text(message))
        # output of the blocks before the bad one comes first
        while "text" not in (message := ws.receive()):
            assert "bytes" in message
        error = json.loads(message["text"])
        closed = ws.receive()
    assert set(error) == {"error"} and closed["type"] == "websocket.close"
    return error["error"], closed["code"]


@pytest.mark.parametrize(
    "query, messages, expected",
    [
        ("sr=abc", [], "sr: "),
        ("sr=0", [], "sr: "),
        ("", [], "sr: Field required"),
        ("sr=8000&gain=-1", [], "gain: "),
        ("sr=8000&gain=nan", [], "gain: "),
        ("sr=8000", [b"abc"], "float32"),
        ("sr=8000", ["start"], "float32"),
        ("sr=8000", [np.zeros(8001, "<f4").tobytes()], "at most 1 s"),
        ("sr=8000", [np.full(100, np.nan, "<f4").tobytes()], "NaN"),
        ("sr=8000", [np.zeros(8000, "<f4").tobytes()] * 2, "limit of 1.5 s"),
    ],
)
def test_stream_errors_are_a_json_message_then_close_1008(resolver, query, messages, expected):
    with client_for(resolver, max_seconds=1.5) as client:
        error, code = stream_error(client, query, *messages)
        assert expected in error and code == 1008
        assert client.get("/healthz").json()["streams"] == 0


def test_streams_beyond_the_limit_are_refused_until_one_ends(resolver):
    with client_for(resolver, max_streams=1) as client:
        with client.websocket_connect("/v1/stream?sr=8000") as first:
            first.send_bytes(clip(0.1, 8000).tobytes())
            assert client.get("/healthz").json()["streams"] == 1
            error, code = stream_error(client, "sr=8000")
            assert "already running" in error and code == 1013
        wait_until(lambda: client.get("/healthz").json()["streams"] == 0)
        assert stream_through(client, "sr=8000", [clip(0.1, 8000)])[1] == 1000


# --- a real server --------------------------------------------------------------------------


def test_a_client_that_disconnects_leaves_no_work_running(chunked):
    chunked.delay = 0.1  # 50 passes of at least 0.1 s
    data = wav_bytes(clip(1.0, 8000), 8000)
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        f"Content-Type: audio/wav\r\n\r\n".encode() + data + f"\r\n--{boundary}--\r\n".encode()
    )
    with real_server(chunked) as (url, app):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(
                f"POST /v1/superresolve HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            )
            wait_until(lambda: chunked.passes >= 2)
        wait_until(lambda: not app.state.service.health().running)
        assert chunked.passes < 25


def test_schemathesis_finds_no_server_error(resolver):
    # Driven through hypothesis directly: schemathesis' pytest plugin does not run under
    # pytest 9 (it reads a private node attribute that pytest removed).
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    with real_server(resolver, max_upload_bytes=4096) as (url, _):
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) == 7
        # valid requests, and requests that break the schema (healthz takes no input to break)
        runs = [(op, schemathesis.GenerationMode.POSITIVE) for op in operations] + [
            (op, schemathesis.GenerationMode.NEGATIVE)
            for op in operations
            if op.label != "GET /healthz"
        ]
        for operation, mode in runs:

            @given(case=operation.as_strategy(mode))
            @settings(
                max_examples=25,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def check(case):
                case.call_and_validate(checks=checks)

            check()


# --- the page and the command line ---------------------------------------------------------


def test_page_docs_and_health(resolver):
    with client_for(resolver) as client:
        page = client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert '<script src="/static/app.js">' in page.text
        # the page asks for what the API does by default: the input's own band kept
        for checkbox in ("keep_lowband", "live-lowband"):
            assert re.search(rf'<input id="{checkbox}" type="checkbox" checked>', page.text)
        for asset in ("/static/app.js", "/static/style.css"):
            assert client.get(asset).status_code == 200
        assert_error(client.get("/static/missing.js"), 404)
        assert client.get("/docs").status_code == 200
        paths = client.get("/openapi.json").json()["paths"]
        assert {"/v1/superresolve", "/v1/jobs", "/v1/jobs/{job_id}", "/healthz"} <= set(paths)
        health = client.get("/healthz").json()
        assert health == {"status": "ok", "queued": 0, "running": False, "streams": 0}


def test_the_page_loads_nothing_from_other_hosts():
    # src=, href=, url(), fetch() or import of an absolute or protocol-relative URL
    external = re.compile(
        r"""(?:(?:src|href|action)\s*=\s*|url\(\s*|fetch\(\s*|import\s+)["']?(?:[a-z]+:)?//"""
    )
    for name in os.listdir(serve.STATIC_DIR):
        with open(os.path.join(serve.STATIC_DIR, name)) as f:
            text = f.read()
        assert not external.search(text), (name, external.search(text))
    assert external.search('<script src="https://cdn.example/x.js">')
    assert external.search("fetch('//example.org/api')")


def test_main_exits_1_with_one_line_when_the_port_is_taken(capsys):
    with serve.listen("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        assert serve.main(["--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}") and err.count("\n") == 1


def test_main_exits_1_with_one_line_for_a_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "g_bad"
    bad.write_bytes(b"not a checkpoint")
    assert serve.main(["--port", "0", "--checkpoint_file", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and err.count("\n") == 1
