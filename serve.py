"""A local web service and page for speech super-resolution (FastAPI on uvicorn).

    python serve.py [--host 127.0.0.1] [--port 8000] [--checkpoint_file g_X]

loads the model once and serves, on 127.0.0.1:8000 by default:

- `/`: a page to pick, drop or record a file, see its detected bandwidth and the progress, compare
  spectrograms, listen to both and download the result, or run the microphone live through the
  model with its latency shown (static/, nothing from other hosts);
- `POST /v1/superresolve`: a multipart audio file -> audio/wav at 48 kHz, the input's own band
  kept and only the band above it from the model (keep_lowband=false: the model's raw output);
- `POST /v1/jobs`, `GET /v1/jobs/{id}`, `GET /v1/jobs/{id}/result`,
  `GET /v1/jobs/{id}/spectrogram/{input|output}`, `DELETE /v1/jobs/{id}`: the same for long files,
  with progress; finished jobs expire;
- `WS /v1/stream?sr=N[&gain=G][&keep_lowband=false]`: live super-resolution through
  `SuperResolver.stream`, the input's own band below N / 2 kept (keep_lowband=false: the model's
  raw output): binary messages of float32 little-endian mono samples at N Hz in (at most 1 s each),
  binary float32 samples at 48 kHz out as soon as they are final; the text message "end" sends the
  rest and closes. Errors: a text message {"error": "..."}, then close 1008 (1013 while all
  `max_streams` are in use);
- `GET /healthz`, and the OpenAPI page at `/docs` (served from local files).

All inference goes through `inference_wav.SuperResolver` on one worker thread fed by a bounded
queue (the machine has few cores): a request beyond the queue gets 429 at once, a cancelled job or
a client that disconnects stops its work at the next generator pass. Live streams run beside
that worker (at most `max_streams`), as they cannot wait in a queue. Errors are JSON
`{"error": "..."}`; uploads are decoded from server-named temporary files, removed at once.
"""

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import io
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from typing import Annotated, Literal

import numpy as np
import soundfile as sf
import torch
import uvicorn
from fastapi import (
    Depends,
    FastAPI,
    File,
    Form,
    Path,
    Query,
    Request,
    UploadFile,
    WebSocket,
    WebSocketDisconnect,
)
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError, WebSocketRequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException

import dataset
import metrics
import stream
import utils
from inference_wav import FILE_ERRORS, SuperResolver, detect_bandwidth, write_audio
from utils import SAMPLING_RATE, one_line

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
# How often a request waiting for its result checks whether the client is still there.
POLL_SECONDS = 0.1
# Spectrogram images: colour range below the louder image's peak, and at most this many columns
# (longer clips average neighbouring frames, so memory does not grow with the file).
SPECTROGRAM_RANGE_DB = 80.0
SPECTROGRAM_COLUMNS = 1200
# Live streams: the largest message, and how long a silent client keeps its slot.
STREAM_BLOCK_SECONDS = 1.0
STREAM_IDLE_SECONDS = 30.0
MAX_STREAM_RATE = 384000
# multipart framing around the file itself: the body may exceed the file limit by this much
FORM_OVERHEAD_BYTES = 64 * 1024
WAV = {"audio/wav": {"schema": {"type": "string", "format": "binary"}}}
PNG = {"image/png": {"schema": {"type": "string", "format": "binary"}}}


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one server accepts.

    Args:
        max_upload_bytes: largest upload (413 beyond it).
        max_seconds: longest clip (413 beyond it).
        queue_size: requests waiting behind the running one (429 beyond it).
        result_ttl: seconds a finished job and its result are kept.
        max_streams: live streams at once (WS /v1/stream), beside the job worker.
    """

    max_upload_bytes: int = 100 * 2**20
    max_seconds: float = 600.0
    queue_size: int = 4
    result_ttl: float = 900.0
    max_streams: int = 1


class ErrorBody(BaseModel):
    error: str


class InputInfo(BaseModel):
    name: str
    sample_rate: int
    channels: int
    seconds: float
    bandwidth_hz: float


class JobStatus(BaseModel):
    id: str
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    progress: float
    position: int | None
    error: str | None
    input: InputInfo


class Health(BaseModel):
    status: str
    queued: int
    running: bool
    streams: int


class ApiError(HTTPException):
    """An HTTP error whose message goes to the client as {"error": message}."""


class Cancelled(Exception):
    """Raised inside the inference loop when its job was cancelled."""


@dataclasses.dataclass(frozen=True)
class Options:
    keep_lowband: bool
    input_sr: int | None
    audio_format: str


@dataclasses.dataclass(eq=False)
class Job:
    # [channels, T] at `info.sample_rate`; dropped when the job ends
    audio: np.ndarray | None
    info: InputInfo
    options: Options
    plots: bool  # spectrograms for the page (jobs), none for /v1/superresolve
    id: str = dataclasses.field(default_factory=lambda: secrets.token_urlsafe(12))
    state: str = "queued"
    progress: float = 0.0
    error: str | None = None
    status_code: int = 400  # of `error`: 400 for bad input, 500 for a bug
    wav: bytes | None = None
    spectrograms: dict[str, bytes] = dataclasses.field(default_factory=dict)
    ended_at: float | None = None
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def ended(self) -> bool:
        return self.ended_at is not None


class Service:
    """One inference thread fed by a bounded queue, and the table of jobs (by id)."""

    def __init__(self, resolver: SuperResolver, limits: Limits):
        self.resolver = resolver
        self.limits = limits
        self.tmp_dir = None
        self._pending = collections.deque()
        self._running = None
        self._jobs = {}
        self._stopping = False
        self._wake = threading.Condition()
        self._thread = None
        self._streams = 0

    def start(self) -> None:
        self.tmp_dir = tempfile.mkdtemp(prefix="wave_u_mamba_serve_")
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            for job in [*self._pending, self._running]:
                if job is not None:
                    job.cancelled.set()
            self._wake.notify()
        self._thread.join()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def submit(self, job: Job, keep: bool) -> None:
        """Queues `job` (and, if `keep`, lists it under its id); ApiError 429 when full."""
        self.sweep()
        with self._wake:
            if len(self._pending) >= self.limits.queue_size:
                raise ApiError(429, f"queue full ({self.limits.queue_size} waiting); retry later")
            self._pending.append(job)
            if keep:
                self._jobs[job.id] = job
            self._wake.notify()

    def job(self, job_id: str) -> Job:
        self.sweep()
        with self._wake:
            if job_id not in self._jobs:
                raise ApiError(404, "no such job (unknown, deleted or expired)")
            return self._jobs[job_id]

    def cancel(self, job: Job) -> None:
        """Stops `job` (a running one at its next generator pass) and forgets it."""
        job.cancelled.set()
        with self._wake:
            self._jobs.pop(job.id, None)
            if job in self._pending:
                self._pending.remove(job)
                self._end(job, "cancelled")

    def position(self, job: Job) -> int | None:
        """1 for the next job to run, None when it is not waiting."""
        with self._wake:
            return self._pending.index(job) + 1 if job in self._pending else None

    def health(self) -> Health:
        with self._wake:
            return Health(
                status="ok",
                queued=len(self._pending),
                running=bool(self._running),
                streams=self._streams,
            )

    def open_stream(self) -> bool:
        """Takes a live-stream slot; False when all `max_streams` are taken."""
        with self._wake:
            if self._streams >= self.limits.max_streams:
                return False
            self._streams += 1
            return True

    def close_stream(self) -> None:
        with self._wake:
            self._streams -= 1

    def sweep(self) -> None:
        """Forgets jobs that ended more than `result_ttl` seconds ago."""
        oldest = time.monotonic() - self.limits.result_ttl
        with self._wake:
            for job_id in [i for i, j in self._jobs.items() if j.ended and j.ended_at < oldest]:
                del self._jobs[job_id]

    @staticmethod
    def _end(job: Job, state: str, error: str | None = None) -> None:
        job.audio = None
        job.state, job.error = state, error
        job.ended_at = time.monotonic()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._stopping:
                    self._wake.wait(timeout=self.limits.result_ttl)
                    self.sweep()
                if self._stopping:
                    for job in self._pending:
                        self._end(job, "cancelled")
                    return
                job = self._running = self._pending.popleft()
                job.state = "running"
            try:
                self._process(job)
            finally:
                with self._wake:
                    self._running = None

    def _process(self, job: Job) -> None:
        """Runs one job through the SuperResolver and stores its WAV (and spectrograms)."""

        def report(fraction):
            if job.cancelled.is_set():
                raise Cancelled
            job.progress = fraction

        try:
            report(0.0)
            y, _ = self.resolver.upsample(
                job.audio,
                job.info.sample_rate,
                job.options.input_sr,
                job.options.keep_lowband,
                progress=report,
            )
            if job.plots:
                job.spectrograms = spectrogram_pngs(job.audio, job.info.sample_rate, y)
            job.wav = self._encode(job, y)
        except Cancelled:
            self._end(job, "cancelled")
        except FILE_ERRORS as e:
            self._end(job, "failed", one_line(e))
        except Exception:  # a bug: the traceback goes to the log, never to the client
            traceback.print_exc()
            job.status_code = 500
            self._end(job, "failed", "internal error while processing the audio")
        else:
            job.progress = 1.0
            self._end(job, "done")

    def _encode(self, job: Job, y: np.ndarray) -> bytes:
        path = os.path.join(self.tmp_dir, job.id + ".wav")
        try:
            write_audio(path, y, job.options.audio_format, job.info.name)
            with open(path, "rb") as f:
                return f.read()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def log_spectrogram(audio: np.ndarray) -> np.ndarray:
    """[channels, T] 48 kHz audio -> [F, N] dB: utils.power_db's spectrogram, its power averaged
    over channels and, past SPECTROGRAM_COLUMNS frames, over neighbouring frames."""
    # power_db's centred frames reflect half a window at each end: pad clips shorter than that
    audio = np.pad(audio, ((0, 0), (0, max(0, metrics.N_FFT // 2 + 1 - audio.shape[1]))))
    db = np.stack([utils.power_db(channel, metrics.N_FFT, metrics.HOP_SIZE) for channel in audio])
    power = torch.from_numpy(10 ** (db / 10)).mean(dim=0)  # [F, N]
    group = -(-power.shape[1] // SPECTROGRAM_COLUMNS)
    if group > 1:
        power = torch.nn.functional.avg_pool1d(power[None], group, ceil_mode=True)[0]
    return (10 * torch.log10(power)).float().numpy()


def spectrogram_pngs(audio: np.ndarray, sr: int, y: np.ndarray) -> dict[str, bytes]:
    """PNG spectrograms of the input (resampled to 48 kHz) and the output, on one colour scale."""
    plt = utils.pyplot()
    seconds = audio.shape[-1] / sr
    specs = {
        "input": log_spectrogram(np.atleast_2d(dataset.resample(audio, sr, SAMPLING_RATE))),
        "output": log_spectrogram(np.atleast_2d(y)),
    }
    vmax = max(float(s.max()) for s in specs.values())
    images = {}
    for name, spec in specs.items():
        fig, ax = plt.subplots(figsize=(6.4, 2.6))
        utils.plot_spectrogram(spec, ax, SAMPLING_RATE, vmin=vmax - SPECTROGRAM_RANGE_DB, vmax=vmax)
        # plot_spectrogram counts frames; the page wants seconds
        ax.images[0].set_extent((0, seconds, 0, SAMPLING_RATE / 2000))
        ax.set_xlim(0, seconds)
        ax.set_xlabel("s")
        ax.set_title(f"{name} (dB)", fontsize=9)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=80)
        plt.close(fig)
        images[name] = buffer.getvalue()
    return images


def declared_seconds(path: str) -> float:
    """The length an audio file's header declares, in seconds (0 if it cannot be read: the
    decoder then says why)."""
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError, TypeError):
        return 0.0
    return info.frames / info.samplerate if info.samplerate > 0 else 0.0


def check_length(seconds: float, max_seconds: float) -> None:
    """ApiError 413 for a clip longer than `max_seconds`."""
    if seconds > max_seconds:
        raise ApiError(413, f"audio is {seconds:.1f} s long; the limit is {max_seconds:g} s")


async def read_upload(service: Service, upload: UploadFile) -> tuple[np.ndarray, InputInfo]:
    """Decodes an upload through a server-named temporary file (removed at once) and checks it.

    Returns:
        (audio [channels, T], InputInfo). ApiError 400 for unreadable, empty or silent audio,
        413 for a clip longer than the limit.
    """
    fd, path = tempfile.mkstemp(dir=service.tmp_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            while block := await upload.read(1 << 20):
                f.write(block)
        # the declared length first: a small compressed file can decode to hours of audio
        check_length(declared_seconds(path), service.limits.max_seconds)
        audio, sr = await run_in_threadpool(dataset.load_audio, path)
        seconds = audio.shape[1] / sr
        check_length(seconds, service.limits.max_seconds)
        bandwidth = await run_in_threadpool(detect_bandwidth, audio, sr)
    except ValueError as e:
        # the message names our temporary file; the client knows its file as "upload"
        raise ApiError(400, one_line(e).replace(path, "upload")) from None
    finally:
        os.remove(path)
    name = os.path.basename(upload.filename or "upload")
    info = InputInfo(
        name=name,
        sample_rate=sr,
        channels=audio.shape[0],
        seconds=seconds,
        bandwidth_hz=bandwidth,
    )
    return audio, info


def form_options(
    keep_lowband: Annotated[
        bool,
        Form(
            description="keep the input's own band; the model adds only what lies above "
            "(false: the model's raw output)"
        ),
    ] = True,
    input_sr: Annotated[
        str,
        Form(
            pattern=r"^(auto|[1-9][0-9]{0,5})$",
            description="rate whose Nyquist frequency is the input's bandwidth (keep_lowband), "
            "or auto to detect it",
        ),
    ] = "auto",
    audio_format: Annotated[
        Literal["pcm16", "float"],
        Form(
            alias="format",
            description="pcm16 (scaled down if it would clip) or float32",
        ),
    ] = "pcm16",
) -> Options:
    return Options(keep_lowband, None if input_sr == "auto" else int(input_sr), audio_format)


def attachment_name(info: InputInfo) -> str:
    """`<stem>_superresolved.wav`, reduced to characters safe in a header."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.splitext(info.name)[0])[:100] or "audio"
    return f'attachment; filename="{stem}_superresolved.wav"'


def job_status(service: Service, job: Job) -> JobStatus:
    return JobStatus(
        id=job.id,
        state=job.state,
        progress=job.progress,
        position=service.position(job),
        error=job.error,
        input=job.info,
    )


class BodyLimit:
    """ASGI middleware: 413 for a request body over `max_bytes`, declared or streamed."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"upload larger than the limit of {self.max_bytes / 2**20:g} MB"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes + FORM_OVERHEAD_BYTES:
            response = JSONResponse({"error": message}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message_in = await receive()
            received += len(message_in.get("body", b""))
            if received > self.max_bytes + FORM_OVERHEAD_BYTES:
                raise ApiError(413, message)
            return message_in

        await self.app(scope, counted, send)


def create_app(resolver: SuperResolver, limits: Limits = Limits()) -> FastAPI:
    """The FastAPI app around one loaded SuperResolver (see the module docstring)."""
    service = Service(resolver, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(
        title="Wave-U-Mamba speech super-resolution",
        description='Upsamples speech of any rate to 48 kHz. Errors are JSON {"error": "..."}. '
        "Live streams use the WebSocket /v1/stream (see serve.py's docstring).",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # served below from local files: the default loads them from a CDN
        redoc_url=None,
    )
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes)
    add_error_handlers(app)
    add_routes(app, service)
    add_job_routes(app, service)
    add_stream_route(app, service)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_dir()), name="docs-assets")
    return app


def swagger_ui_dir() -> str:
    """Swagger UI's files as the swagger-ui-py package ships them (so /docs works offline)."""
    import swagger_ui

    return os.path.join(os.path.dirname(swagger_ui.__file__), "static")


def describe_problems(
    e: RequestValidationError | WebSocketRequestValidationError,
) -> str:
    """FastAPI's validation errors as one line: "field: problem; field: problem"."""
    return "; ".join(
        f"{'.'.join(str(part) for part in err['loc'][1:]) or 'request'}: {err['msg']}"
        for err in e.errors()
    )


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request, e):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        return JSONResponse({"error": describe_problems(e)}, status_code=422)

    @app.exception_handler(WebSocketRequestValidationError)
    async def stream_validation_error(websocket, e):
        # accepted first, so that the browser sees the reason and not a failed handshake
        await websocket.accept()
        await close_with_error(websocket, describe_problems(e))

    @app.exception_handler(Exception)
    async def internal_error(request, e):
        return JSONResponse({"error": "internal error"}, status_code=500)


ERRORS = {
    status: {"model": ErrorBody, "description": description}
    for status, description in [
        (400, "unreadable, empty or silent audio"),
        (413, "upload or clip over the limits"),
        (422, "a bad option"),
        (429, "queue full"),
    ]
}
NOT_FOUND = {404: {"model": ErrorBody, "description": "unknown, deleted or expired job"}}
JobId = Annotated[str, Path(max_length=64)]


def add_routes(app: FastAPI, service: Service) -> None:
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"))

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=app.title,
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/static/favicon.svg",
        )

    @app.get("/healthz")
    async def healthz() -> Health:
        return service.health()

    @app.post(
        "/v1/superresolve",
        response_class=Response,
        responses={200: {"content": WAV, "description": "48 kHz WAV"}, **ERRORS},
    )
    async def superresolve(
        request: Request,
        file: Annotated[UploadFile, File(description="audio: wav, flac, ogg, mp3, ...")],
        options: Annotated[Options, Depends(form_options)],
    ):
        """Super-resolves one file and answers with the 48 kHz WAV (same channels, duration)."""
        audio, info = await read_upload(service, file)
        job = Job(audio, info, options, plots=False)
        service.submit(job, keep=False)
        while not job.ended:
            await asyncio.sleep(POLL_SECONDS)
            if await request.is_disconnected():
                service.cancel(job)
                return Response(status_code=499)
        if job.state != "done":
            raise ApiError(job.status_code, job.error or job.state)
        headers = {
            "Content-Disposition": attachment_name(info),
            "X-Input-Bandwidth-Hz": f"{info.bandwidth_hz:g}",
        }
        return Response(job.wav, media_type="audio/wav", headers=headers)


def add_job_routes(app: FastAPI, service: Service) -> None:
    @app.post("/v1/jobs", status_code=202, responses=ERRORS)
    async def create_job(
        file: Annotated[UploadFile, File(description="audio: wav, flac, ogg, mp3, ...")],
        options: Annotated[Options, Depends(form_options)],
    ) -> JobStatus:
        """Queues a file; poll GET /v1/jobs/{id}, then fetch its result."""
        audio, info = await read_upload(service, file)
        job = Job(audio, info, options, plots=True)
        service.submit(job, keep=True)
        return job_status(service, job)

    @app.get("/v1/jobs/{job_id}", responses=NOT_FOUND)
    async def get_job(job_id: JobId) -> JobStatus:
        """State (queued, running, done, failed, cancelled) and progress (0-1)."""
        return job_status(service, service.job(job_id))

    def finished(job_id: str) -> Job:
        job = service.job(job_id)
        if job.state != "done":
            detail = f"job failed: {job.error}" if job.state == "failed" else f"job is {job.state}"
            raise ApiError(409, detail)
        return job

    conflict = {409: {"model": ErrorBody, "description": "the job has not finished well"}}

    @app.get(
        "/v1/jobs/{job_id}/result",
        response_class=Response,
        responses={
            200: {"content": WAV, "description": "48 kHz WAV"},
            **NOT_FOUND,
            **conflict,
        },
    )
    async def get_result(job_id: JobId):
        job = finished(job_id)
        headers = {"Content-Disposition": attachment_name(job.info)}
        return Response(job.wav, media_type="audio/wav", headers=headers)

    @app.get(
        "/v1/jobs/{job_id}/spectrogram/{which}",
        response_class=Response,
        responses={
            200: {"content": PNG, "description": "PNG"},
            **NOT_FOUND,
            **conflict,
        },
    )
    async def get_spectrogram(job_id: JobId, which: Literal["input", "output"]):
        """The input's (resampled to 48 kHz) or the output's spectrogram, one colour scale."""
        return Response(finished(job_id).spectrograms[which], media_type="image/png")

    @app.delete("/v1/jobs/{job_id}", status_code=204, responses=NOT_FOUND)
    async def delete_job(job_id: JobId):
        """Cancels a queued or running job, or deletes a finished one."""
        service.cancel(service.job(job_id))
        return Response(status_code=204)


async def close_with_error(websocket: WebSocket, message: str, code: int = 1008) -> None:
    """Sends {"error": message} and closes (1008: policy violation), unless the client left."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        await websocket.send_json({"error": message})
        await websocket.close(code)


async def relay(websocket: WebSocket, processor, sr: int, max_seconds: float) -> None:
    """Feeds a stream's binary messages through `processor` and sends back what it makes final,
    until the text message "end" (then the rest, and close) or a disconnect."""
    received = 0
    while True:
        try:
            message = await asyncio.wait_for(websocket.receive(), STREAM_IDLE_SECONDS)
        except TimeoutError:
            raise ValueError(f"no audio for {STREAM_IDLE_SECONDS:g} s") from None
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") == "end":
            y = await run_in_threadpool(processor.flush)
            await websocket.send_bytes(y.astype("<f4").tobytes())
            await websocket.close(1000)
            return
        data = message.get("bytes")
        if data is None or len(data) % 4:
            raise ValueError('send float32 samples as binary messages, then the text "end"')
        if len(data) // 4 > STREAM_BLOCK_SECONDS * sr:
            raise ValueError(f"a message holds at most {STREAM_BLOCK_SECONDS:g} s of audio")
        received += len(data) // 4
        if received > max_seconds * sr:
            raise ValueError(f"stream longer than the limit of {max_seconds:g} s")
        y = await run_in_threadpool(processor.process, np.frombuffer(data, "<f4"))
        if len(y):
            await websocket.send_bytes(y.astype("<f4").tobytes())


def add_stream_route(app: FastAPI, service: Service) -> None:
    @app.websocket("/v1/stream")
    async def live(
        websocket: WebSocket,
        sr: Annotated[int, Query(gt=0, le=MAX_STREAM_RATE)],
        gain: Annotated[float, Query(gt=0, allow_inf_nan=False)] = stream.DEFAULT_GAIN,
        keep_lowband: bool = True,
    ):
        """Live super-resolution (see the module docstring for the protocol)."""
        await websocket.accept()
        if not service.open_stream():
            busy = f"{service.limits.max_streams} live stream(s) already running; retry later"
            return await close_with_error(websocket, busy, 1013)
        try:
            lowband_hz = sr / 2 if keep_lowband else None
            processor = service.resolver.stream(sr, gain, 1, lowband_hz)
            await relay(websocket, processor, sr, service.limits.max_seconds)
        except ValueError as e:
            await close_with_error(websocket, one_line(e))
        except WebSocketDisconnect:
            pass
        finally:
            service.close_stream()


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (IPv4 or IPv6); OSError if it is taken."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, port), family=family)


def main(argv=None) -> int:
    """The command line; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--checkpoint_file",
        default=None,
        help="g_ checkpoint or generator state_dict (default: the shipped pretrained model)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    defaults = Limits()
    parser.add_argument("--max_upload_mb", type=float, default=defaults.max_upload_bytes / 2**20)
    parser.add_argument("--max_seconds", type=float, default=defaults.max_seconds)
    parser.add_argument(
        "--queue_size",
        type=int,
        default=defaults.queue_size,
        help="requests waiting (429 beyond)",
    )
    parser.add_argument(
        "--result_ttl",
        type=float,
        default=defaults.result_ttl,
        help="seconds results are kept",
    )
    parser.add_argument(
        "--max_streams",
        type=int,
        default=defaults.max_streams,
        help="live streams at once",
    )
    a = parser.parse_args(argv)
    if min(a.max_upload_mb, a.max_seconds, a.queue_size, a.result_ttl, a.max_streams) <= 0:
        parser.error("limits must be positive")
    limits = Limits(
        round(a.max_upload_mb * 2**20),
        a.max_seconds,
        a.queue_size,
        a.result_ttl,
        a.max_streams,
    )
    try:
        sock = listen(a.host, a.port)
    except OSError as e:
        # create_server appends the address to strerror; errno's own text is enough
        reason = os.strerror(e.errno) if (e.errno or 0) > 0 else e.strerror or one_line(e)
        utils.print_error(f"cannot listen on {a.host}:{a.port}: {reason}")
        return 1
    try:
        resolver = SuperResolver.from_pretrained(a.checkpoint_file, a.device)
    except FILE_ERRORS as e:
        sock.close()
        utils.print_error(e)
        return 1
    host = f"[{a.host}]" if ":" in a.host else a.host
    print(
        f"serving on http://{host}:{sock.getsockname()[1]}/",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(create_app(resolver, limits), log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
