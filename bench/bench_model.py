"""Generator speed on CPU: real-time factor, peak memory, the float32 floor, training step time.

Run from the repo root: `python -m bench.bench_model` (several minutes; see --help). Each case
runs in a fresh subprocess so its peak resident memory (ru_maxrss) is its own: the generator's
forward, and the public API (`SuperResolver.upsample` with the shipped model on 16 kHz
speech). Beside wall-clock RTF each row gives the process CPU time per second of audio, which
other jobs on a shared machine disturb much less. `--baseline REV` times the code of an older
commit (a temporary `git worktree`, run by this script's own workers) beside this checkout's,
alternated `--rounds` times, so that a shared machine's drift falls on both alike. Prints
Markdown tables; no asserts.
"""

import argparse
import contextlib
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

# read as utils.SAMPLING_RATE when used: the train worker also runs on older commits' code,
# whose utils may not have it
import utils


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def matmul_gflops(n: int = 1024, runs: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    # the best run: the floor is what the machine can do, not what the other jobs leave
    return 2 * n**3 / min(times) / 1e9


def noise_input(generator, seconds: float) -> torch.Tensor:
    """[1, 1, T] noise at 0.1 for `seconds` of audio, T cut to a multiple of generator.hop."""
    length = int(seconds * utils.SAMPLING_RATE) // generator.hop * generator.hop
    return torch.randn(1, 1, length) * 0.1


def generator_gflop_per_second_of_audio(seconds: float = 0.2) -> tuple[float, float]:
    """FLOPs of one forward per second of audio: (matmuls + convs counted, scan estimated).

    The scan is estimated at 7 FLOPs per channel, state and step (dt*A, exp, dt*B*u,
    h = dA*h + dBu, and C.h), since FlopCounterMode sees only matmuls and convs.
    """
    import ssm
    from models import WaveUMamba

    g = WaveUMamba(scan_impl="ref").eval()
    g.remove_weight_norm()
    x = noise_input(g, seconds)
    scan_flops = [0]
    scan = ssm.selective_scan

    def counted_scan(u, delta, A, *args, **kwargs):
        scan_flops[0] += 7 * u.numel() * A.shape[1]  # u: [B, d_inner, L]; A: [d_inner, N]
        return scan(u, delta, A, *args, **kwargs)

    counter = FlopCounterMode(display=False)
    # Gradient mode on, so that MambaStack runs one pass (without it the stack goes through
    # its stream path in pieces, the same work); no parameter needs a gradient, so no graph is
    # kept (the workers inherit this process's peak memory).
    g.requires_grad_(False)
    ssm.selective_scan = counted_scan
    try:
        with counter:
            g(x)
    finally:
        ssm.selective_scan = scan
    audio_seconds = x.shape[-1] / utils.SAMPLING_RATE
    return (
        counter.get_total_flops() / audio_seconds / 1e9,
        scan_flops[0] / audio_seconds / 1e9,
    )


def worker_rtf(args) -> dict:
    from models import WaveUMamba

    torch.manual_seed(0)
    g = WaveUMamba(scan_impl=args.impl).eval()
    g.remove_weight_norm()
    x = noise_input(g, args.seconds)
    times, cpu = [], []
    with torch.inference_mode():
        for _ in range(args.warmup + args.runs):
            t0, c0 = time.perf_counter(), time.process_time()
            g(x)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    times = times[args.warmup :]
    seconds = x.shape[-1] / utils.SAMPLING_RATE
    return {
        "matmul_gflops": matmul_gflops(),
        "rtf": statistics.median(times) / seconds,
        "rtf_best": min(times) / seconds,
        "cpu_per_s": statistics.median(cpu[args.warmup :]) / seconds,
        "times": times,
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
    }


def worker_api(args) -> dict:
    """SuperResolver.upsample, the public API with the shipped model, on args.seconds of
    16 kHz speech (examples/sample_8k.wav, resampled and repeated to that length)."""
    import numpy as np
    import soundfile as sf
    import soxr

    from inference_wav import SuperResolver

    speech, sr = sf.read(os.path.join("examples", "sample_8k.wav"), dtype="float32")
    audio = np.resize(soxr.resample(speech, sr, 16000), int(args.seconds * 16000))
    model = SuperResolver.from_pretrained(scan_impl=args.impl)
    times, cpu = [], []
    for _ in range(args.warmup + args.runs):
        t0, c0 = time.perf_counter(), time.process_time()
        model.upsample(audio, sr=16000)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    times = times[args.warmup :]
    return {
        "matmul_gflops": matmul_gflops(),
        "rtf": statistics.median(times) / args.seconds,
        "rtf_best": min(times) / args.seconds,
        "cpu_per_s": statistics.median(cpu[args.warmup :]) / args.seconds,
        "times": times,
        "peak_rss_mb": peak_rss_mb(),
    }


def worker_profile(args) -> dict:
    """Wall time per block type in one forward, from torch.profiler: the scan, Mamba's
    projections (either path: ssm.project_compiled or ssm._project), its mixer (ssm.Mamba.mix),
    the channel LayerNorms and the U-Net's conv layers run inside labelled ranges (their
    inclusive time).
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    import ssm
    from models import ChannelLayerNorm, WaveUMamba

    def labelled(fn, label):
        def wrapper(*a, **k):
            with record_function(label):
                return fn(*a, **k)

        return wrapper

    torch.manual_seed(0)
    g = WaveUMamba(scan_impl=args.impl).eval()
    g.remove_weight_norm()
    for name, module in g.named_modules():
        unet_conv = isinstance(module, (torch.nn.Conv1d, torch.nn.ConvTranspose1d))
        if isinstance(module, ChannelLayerNorm):
            module.forward = labelled(module.forward, "layernorm")
        elif unet_conv and ".mamba." not in name:
            module.forward = labelled(module.forward, "convs")
    x = noise_input(g, args.seconds)
    scan, mix = ssm.selective_scan, ssm.Mamba.mix
    projects = ssm.project_compiled, ssm._project
    ssm.selective_scan = labelled(scan, "scan")
    ssm.Mamba.mix = labelled(mix, "mamba")
    ssm.project_compiled, ssm._project = (labelled(f, "projections") for f in projects)
    try:
        with torch.inference_mode():
            g(x)  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                g(x)
                total = time.perf_counter() - t0
    finally:
        ssm.selective_scan, ssm.Mamba.mix = scan, mix
        ssm.project_compiled, ssm._project = projects
    events = {e.key: e for e in prof.key_averages()}

    def inclusive(key):
        return events[key].cpu_time_total / 1e6 if key in events else 0.0

    projections = inclusive("projections")
    split = {
        "selective scan": inclusive("scan"),
        "Mamba projections (in_proj, x_proj, dt_proj, out_proj)": projections,
        "Mamba rest (depthwise conv + SiLU, small ops)": inclusive("mamba")
        - inclusive("scan")
        - projections,
        "LayerNorm + LeakyReLU (channel norms, Mamba pre-norms)": inclusive("layernorm"),
        "U-Net convs (conv units, ConvTranspose, ResBlocks, head)": inclusive("convs"),
    }
    # the profiler's own overhead is in `total` too, so the rest is an upper bound
    split["everything else (residual adds, pooling, activations)"] = total - sum(
        split.values()
    )
    return {"total": total, "split": split}


def worker_train(args) -> dict:
    """One G + D training step (train.py's build and train_step) at the given batch."""
    import train
    from utils import load_config

    torch.manual_seed(0)
    y = torch.randn(args.batch, 1, args.segment) * 0.1
    x = y.clone()
    overrides = [f"train.batch_size={args.batch}"]
    if args.data_root:  # a baseline's worktree has no ../shared beside it
        overrides.append(f"data.root={args.data_root}")
    run = train.build(load_config("cfgs.json", overrides), scan_impl=args.impl)
    times = []
    for _ in range(args.warmup + args.runs):
        t0 = time.perf_counter()
        train.train_step(run, (x, y))
        times.append(time.perf_counter() - t0)
    times = times[args.warmup :]
    return {
        "source": "train.py build + train_step",
        "step_s": statistics.median(times),
        "times": times,
        "peak_rss_mb": peak_rss_mb(),
    }


@contextlib.contextmanager
def code_sources(baseline: str | None):
    """[(label, folder)] of the code to time: a temporary `git worktree` of commit baseline
    (when given), then this checkout; the worktree is removed afterwards."""
    if not baseline:
        yield [("this checkout", ".")]
        return
    worktree = tempfile.mkdtemp(prefix="bench_baseline_")
    added = subprocess.run(
        ["git", "worktree", "add", "--detach", worktree, baseline],
        capture_output=True,
        text=True,
    )
    if added.returncode != 0:
        sys.exit(f"git worktree add {baseline} failed: {added.stderr.strip()}")
    try:
        yield [(f"@{baseline}", worktree), ("this checkout", ".")]
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", worktree])


def run_worker(mode: str, impl: str, args, extra=(), root=".") -> dict:
    """This script as a worker process on the code in folder root (this checkout, or a
    baseline's worktree): the worker imports models, ssm, ... from there."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--impl", impl]
    cmd += ["--seconds", str(args.seconds), "--runs", str(args.runs)]
    cmd += ["--warmup", str(args.warmup), *extra]
    env = dict(os.environ, PYTHONPATH=os.path.abspath(root))
    if args.omp_passive:
        # libgomp reads this when it starts, so only a fresh process can have it
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
        return {"error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impls", nargs="+", default=["torch", "compiled"])
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="torch threads per case"
    )
    parser.add_argument("--train-threads", type=int, default=0, help="0: torch default")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="audio length (RTF)"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--train-impl", default="compiled", help="scan impl for training"
    )
    parser.add_argument("--train-runs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--segment", type=int, default=25600)
    parser.add_argument("--profile-seconds", type=float, default=2.0)
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument(
        "--no-api", action="store_true", help="skip SuperResolver.upsample"
    )
    parser.add_argument(
        "--omp-passive",
        action="store_true",
        help="run the cases with OMP_WAIT_POLICY=PASSIVE (idle threads sleep, not spin)",
    )
    parser.add_argument(
        "--baseline", metavar="REV", help="also time the code of this git commit, alternated"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="alternations of baseline and this checkout"
    )
    parser.add_argument(
        "--worker", choices=["rtf", "api", "profile", "train"], help=argparse.SUPPRESS
    )
    parser.add_argument("--impl", default="torch", help=argparse.SUPPRESS)
    parser.add_argument("--num-threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--data-root", help=argparse.SUPPRESS)
    return parser.parse_args()


def print_profiles(args, ok) -> None:
    """The time split of one forward per scan impl that ran, at its fewest threads."""
    for impl in dict.fromkeys(impl for impl, _ in ok):
        threads = min(t for i, t in ok if i == impl)
        prof_args = argparse.Namespace(
            **{**vars(args), "seconds": args.profile_seconds}
        )
        r = run_worker("profile", impl, prof_args, ["--num-threads", str(threads)])
        if "error" in r:
            print(f"\nprofile {impl} failed: {r['error']}")
            continue
        print(
            f"\nTime split, scan impl {impl}, {threads} thread(s), one forward of "
            f"{args.profile_seconds:g} s ({r['total']:.2f} s):\n"
        )
        print("| block type | s | share |")
        print("|---|---|---|")
        for name, t in r["split"].items():
            print(f"| {name} | {t:.3f} | {100 * t / r['total']:.0f} % |")
        sys.stdout.flush()


def print_train_step(args) -> None:
    """The table of one G + D training step (train.py's build and train_step)."""
    extra = ["--batch", str(args.batch), "--segment", str(args.segment)]
    extra += ["--num-threads", str(args.train_threads)]
    train_args = argparse.Namespace(**{**vars(args), "runs": args.train_runs})
    r = run_worker("train", args.train_impl, train_args, extra)
    print(
        f"\nTraining step (G + MPD + MSD, forward + backward + AdamW, batch {args.batch}, "
        f"{args.segment} samples, scan impl {args.train_impl}, "
        f"{args.train_threads or torch.get_num_threads()} thread(s)):\n"
    )
    print("| source | step (s, median) | runs (s) | peak RSS (MB) |")
    print("|---|---|---|---|")
    if "error" in r:
        print(f"| failed: {r['error']} | | | |")
    else:
        runs = ", ".join(f"{t:.1f}" for t in r["times"])
        print(
            f"| {r['source']} | {r['step_s']:.2f} | {runs} | {r['peak_rss_mb']:.0f} |"
        )


def print_rtf_rows(args, label, root, impl, threads, work) -> list:
    """The generator's and the API's rows for one code, scan impl and thread count; returns
    [(impl, threads)] if the generator ran (for the profile), else []."""
    ran = []
    for mode, what in (("rtf", "generator"), ("api", "API")):
        if mode == "api" and args.no_api:
            continue
        r = run_worker(mode, impl, args, ["--num-threads", str(threads)], root=root)
        if "error" in r:
            print(f"| {label} | {impl} | {threads} | {what} | failed: {r['error']} |" + " |" * 6)
            continue
        if mode == "rtf" and root == ".":
            ran.append((impl, threads))
        runs = ", ".join(f"{t:.1f}" for t in r["times"])
        floor = work / r["matmul_gflops"]
        print(
            f"| {label} | {impl} | {threads} | {what} | {r['rtf']:.3f} | {runs} "
            f"| {r['matmul_gflops']:.0f} | {r['rtf'] / floor:.2f} "
            f"| {r['rtf_best'] / floor:.2f} | {r['cpu_per_s']:.2f} "
            f"| {r['peak_rss_mb']:.0f} |"
        )
        sys.stdout.flush()
    return ran


def main():
    args = _parse_args()

    default_threads = torch.get_num_threads()
    if args.worker:
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        fn = {
            "rtf": worker_rtf,
            "api": worker_api,
            "profile": worker_profile,
            "train": worker_train,
        }
        print(json.dumps(fn[args.worker](args)))
        return

    dense, scan = generator_gflop_per_second_of_audio()
    work = dense + scan
    print(
        f"## Wave-U-Mamba generator on CPU ({args.seconds:g} s of 48 kHz audio, float32)\n"
    )
    print("| device | torch | threads (default) | date |")
    print("|---|---|---|---|")
    print(
        f"| {cpu_name()} ({os.cpu_count()} cores) | {torch.__version__} "
        f"| {default_threads} | {datetime.datetime.now():%Y-%m-%d %H:%M} |\n"
    )
    print(
        f"Generator work per second of audio: {dense:.1f} GFLOP in convs and matmuls "
        f"(counted) + {scan:.1f} GFLOP in the scan (estimated) = {work:.1f} GFLOP. "
        "Float32 floor = work / matmul rate (1024^3 torch.mm, best of 20), measured by each "
        "row's own process right after its runs, so that a shared machine's slow minutes fall "
        "on both.\n"
    )
    print(
        "Rows: the generator's forward on random audio (`generator`), and "
        "`SuperResolver.upsample` with the shipped model on speech at 16 kHz (`API`), both "
        f"{args.seconds:g} s long"
        + (", with OMP_WAIT_POLICY=PASSIVE" if args.omp_passive else "")
        + ".\n"
    )
    # The floor is the matrix product's best run; "best" puts the generator's best run beside
    # it (the same statistic), "median" its typical one (which a shared machine slows more).
    print(
        "| code | scan impl | threads | what | RTF (median) | runs (s) | matmul GFLOP/s |"
        " RTF / floor (median) | RTF / floor (best run) | CPU s per s of audio |"
        " peak RSS (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ok = []
    with code_sources(args.baseline) as sources:
        for _ in range(args.rounds):
            for label, root in sources:
                for impl in args.impls:
                    for threads in args.threads:
                        ok += print_rtf_rows(args, label, root, impl, threads, work)

    if not args.no_profile:
        print_profiles(args, ok)
    if not args.no_train:
        print_train_step(args)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


if __name__ == "__main__":
    main()
