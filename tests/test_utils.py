"""Config loading, checkpoint naming and atomic writes."""

import ast
import ctypes
import dataclasses
import json
import os
import pickletools
import re
import socket
import subprocess
import sys
import zipfile

import pytest
import torch

import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFGS = os.path.join(ROOT, "cfgs.json")


def write_config(tmp_path, edit):
    with open(CFGS) as f:
        values = json.load(f)
    edit(values)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(values))
    return str(path)


def test_cfgs_json_loads_with_tuples():
    cfg = utils.load_config(CFGS)
    assert cfg.model.channels == (32, 64, 128, 256)
    assert isinstance(cfg.train.learning_rate, float)
    assert utils.config_from_dict(utils.config_to_dict(cfg)) == cfg


def test_unknown_key_is_named(tmp_path):
    path = write_config(tmp_path, lambda v: v["train"].update(lr_decay_typo=0.5))
    with pytest.raises(ValueError, match=r"unknown key 'train.lr_decay_typo'"):
        utils.load_config(path)


def test_missing_key_is_named(tmp_path):
    path = write_config(tmp_path, lambda v: v["loss"].pop("lambda_mel"))
    with pytest.raises(ValueError, match=r"missing key 'loss.lambda_mel'"):
        utils.load_config(path)


def test_wrong_type_and_relations_are_rejected(tmp_path):
    path = write_config(tmp_path, lambda v: v["train"].update(batch_size="32"))
    with pytest.raises(ValueError, match="train.batch_size"):
        utils.load_config(path)
    with pytest.raises(ValueError, match="segment_size"):
        utils.load_config(CFGS, ["audio.segment_size=1000"])
    with pytest.raises(ValueError, match="ratios"):
        utils.load_config(CFGS, ["data.ratios=[7]"])


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["audio.peak=0"], "audio.peak"),
        (["audio.peak=1.5"], "audio.peak"),
        (["audio.peak=NaN"], "audio.peak"),
        (["audio.segment_size=-16"], "audio.segment_size"),
        (["data.num_workers=-1"], "data.num_workers"),
        (["data.random_gain_db=-3"], "data.random_gain_db"),
        (["model.channels=[]"], "model.channels"),
        (["model.channels=[1,8,8,8]"], "model.channels"),
        (["model.down_kernel=0"], "model.down_kernel"),
        (["model.bottleneck_kernel=0"], "model.bottleneck_kernel"),
        (["model.up_kernels=[0,4,8,8]"], "model.up_kernels"),
        (["model.resblock_kernel=4"], "model.resblock_kernel"),
        (["model.resblock_dilations=[1,0]"], "model.resblock_dilations"),
        (["model.head_kernel=6"], "model.head_kernel"),
        (["model.n_mamba_up=-1"], "model.n_mamba_up"),
        (["model.d_state=0"], "model.d_state"),
        (["model.d_conv=0"], "model.d_conv"),
        (["model.expand=0"], "model.expand"),
        (["train.batch_size=0"], "train.batch_size"),
        (["train.learning_rate=0"], "train.learning_rate"),
        (["train.learning_rate=Infinity"], "train.learning_rate"),
        (["train.adam_b1=1"], "train.adam_b1"),
        (["train.adam_b2=-0.5"], "train.adam_b2"),
        (["train.weight_decay=-0.01"], "train.weight_decay"),
        (["train.warmup_epochs=-1"], "train.warmup_epochs"),
        (["train.warmup_start_factor=0"], "train.warmup_start_factor"),
        (["train.lr_decay=1.5"], "train.lr_decay"),
        (["train.grad_clip_g=0"], "train.grad_clip_g"),
        (["train.grad_clip_d=-1"], "train.grad_clip_d"),
        (["train.epochs=0"], "train.epochs"),
        (["train.generator_warmup_steps=-1"], "train.generator_warmup_steps"),
        (["train.seed=-1"], "train.seed"),
        (["train.stdout_interval=0"], "train.stdout_interval"),
        (["train.validation_interval=0"], "train.validation_interval"),
        (["train.checkpoint_interval=0"], "train.checkpoint_interval"),
        (["train.keep_checkpoints=0"], "train.keep_checkpoints"),
        (["train.early_stop_patience=-1"], "train.early_stop_patience"),
        (["loss.lambda_mel=-45"], "loss.lambda_mel"),
        (["loss.stft_fft_sizes=[0,2048,8192]"], "loss.stft_fft_sizes"),
        (["loss.stft_hop_sizes=[256,0,2048]"], "loss.stft_hop_sizes"),
        (["loss.stft_n_mels=0"], "loss.stft_n_mels"),
        (["loss.mel_hop_size=0"], "loss.mel_hop_size"),
        (["loss.mel_win_size=4096"], "loss.mel_win_size"),  # longer than mel_n_fft
        (["loss.mel_n_mels=0"], "loss.mel_n_mels"),
        (["loss.mel_fmin=-1"], "loss.mel_fmin"),
        (["loss.mel_fmax=0"], "loss.mel_fmax"),  # not above mel_fmin
        (["loss.mel_fmax=30000"], "loss.mel_fmax"),  # above the Nyquist frequency
        # combinations: a crop shorter than the 8192-point STFT, or not whole frames
        (["audio.segment_size=4096"], "audio.segment_size"),
        (
            ["model.channels=[4,8,8,8,8]", "model.up_kernels=[4,4,4,4,4]"]
            + ["audio.segment_size=25616"],  # a multiple of 16, not of the hop 32
            "audio.segment_size",
        ),
    ],
)
def test_config_values_out_of_range_are_named(overrides, key):
    with pytest.raises(ValueError, match=rf"cfgs\.json: .*\b{re.escape(key)}\b") as info:
        utils.load_config(CFGS, overrides)
    assert "\n" not in str(info.value)


def test_model_hop_is_two_to_the_stages():
    five_stages = ["model.channels=[4,8,8,8,8]", "model.up_kernels=[4,4,4,4,4]"]
    cfg = utils.load_config(CFGS, five_stages)
    assert cfg.model.hop == 32


def test_overrides():
    cfg = utils.load_config(
        CFGS, ["train.batch_size=4", "model.channels=[4,8,8,8]", "data.root=/x"]
    )
    assert (
        cfg.train.batch_size == 4
        and cfg.model.channels == (4, 8, 8, 8)
        and cfg.data.root == "/x"
    )
    with pytest.raises(ValueError, match="unknown key 'train.nope'"):
        utils.load_config(CFGS, ["train.nope=1"])
    with pytest.raises(ValueError, match="section.key=value"):
        utils.load_config(CFGS, ["batch_size=4"])


def _config_reads(tree, sections) -> set[str]:
    """The "section.key" read as attributes of a config section in a module's syntax tree:
    `X.key` where X ends in the section's name (`cfg.train.seed`, `audio.peak`) or in
    `<section>_cfg` (`train_cfg.seed`). `weight.expand(...)` is no read of model.expand."""
    reads = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            base = node.value
            name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
            section = name.removesuffix("_cfg")
            if section in sections:
                reads.add(f"{section}.{node.attr}")
    return reads


def _generator_keyword_reads(tree) -> set[str]:
    """The model keys WaveUMamba reads: the model section reaches it as keyword arguments
    (WaveUMamba(**dataclasses.asdict(cfg.model))), so a key is read when it is a parameter of
    WaveUMamba.__init__ that the body of __init__ uses."""
    (init,) = [
        item
        for node in tree.body
        if isinstance(node, ast.ClassDef) and node.name == "WaveUMamba"
        for item in node.body
        if isinstance(item, ast.FunctionDef) and item.name == "__init__"
    ]
    used = {
        node.id
        for statement in init.body
        for node in ast.walk(statement)
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)
    }
    return {f"model.{a.arg}" for a in init.args.args if a.arg in used}


def test_every_config_key_is_read_somewhere():
    cfg = utils.load_config(CFGS)
    sections = {section.name for section in dataclasses.fields(cfg)}
    reads = set()
    for name in os.listdir(ROOT):
        if name.endswith(".py") and name != "utils.py":
            with open(os.path.join(ROOT, name)) as f:
                tree = ast.parse(f.read())
            reads |= _config_reads(tree, sections)
            if name == "models.py":
                reads |= _generator_keyword_reads(tree)
    keys = {
        f"{section}.{field.name}"
        for section in sections
        for field in dataclasses.fields(getattr(cfg, section))
    }
    assert sorted(keys - reads) == []


def test_config_reads_are_attribute_reads_of_a_section():
    tree = ast.parse(
        "w.expand(3)\ncfg.train.seed\naudio.peak\nloss_cfg.mel_n_fft\nx = 'model.d_state'"
    )
    sections = {"train", "audio", "loss", "model"}
    assert _config_reads(tree, sections) == {"train.seed", "audio.peak", "loss.mel_n_fft"}


def test_scan_and_prune_checkpoints(tmp_path):
    for step in (5, 120, 30):
        utils.save_checkpoint(str(tmp_path / f"g_{step:08d}"), {"step": step})
    (tmp_path / "g_best").write_text("not numbered")
    newest = utils.scan_checkpoint(str(tmp_path), "g_")
    assert os.path.basename(newest) == "g_00000120"
    assert utils.load_checkpoint(newest)["step"] == 120
    utils.prune_checkpoints(str(tmp_path), "g_", keep=2)
    assert sorted(os.listdir(tmp_path)) == ["g_00000030", "g_00000120", "g_best"]
    assert utils.scan_checkpoint(str(tmp_path), "do_") is None


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.wav"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with utils.atomic_path(str(target)) as tmp:
            assert tmp.endswith(".wav")
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.wav"]
    with utils.atomic_path(str(target)) as tmp:
        with open(tmp, "w") as f:
            f.write("new")
    assert target.read_text() == "new"


def test_remove_stale_temporaries_removes_only_those_of_dead_writers(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    host = socket.gethostname()
    kept = [
        f".tmp_{host}_{os.getpid()}_k3x9w.wav",  # a write in progress
        f".tmp_elsewhere_{dead.pid}_k3x9w.wav",  # another machine's process
        ".tmp_notes.wav",  # not named by atomic_path
        "a.wav",
    ]
    stale = tmp_path / f".tmp_{host}_{dead.pid}_k3x9w.wav"
    for name in kept:
        (tmp_path / name).write_text("x")
    stale.write_text("half")
    assert utils.remove_stale_temporaries(str(tmp_path)) == [str(stale)]
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
    with utils.atomic_path(str(tmp_path / "b.wav")) as tmp:
        assert os.path.basename(tmp).startswith(f".tmp_{host}_{os.getpid()}_")


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        utils.load_checkpoint(str(tmp_path / "g_00000001"))
    bad = tmp_path / "g_00000002"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="cannot read"):
        utils.load_checkpoint(str(bad))


class MakeDirectoryWhenUnpickled:
    """A harmless stand-in for code hidden in a checkpoint: unpickling it creates a folder."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def booby_trap(path, checkpoint: dict, marker) -> str:
    """Saves `checkpoint` plus a payload that creates the folder `marker` if it ever runs."""
    torch.save({**checkpoint, "payload": MakeDirectoryWhenUnpickled(marker)}, path)
    return str(path)


def test_load_checkpoint_refuses_pickled_code(tmp_path):
    marker = tmp_path / "payload_ran"
    path = booby_trap(tmp_path / "g_00000001", {"step": 1}, marker)
    with pytest.raises(ValueError, match=r"refusing to load .*g_00000001") as info:
        utils.load_checkpoint(path)
    assert "\n" not in str(info.value) and "posix.mkdir" in str(info.value)
    assert not marker.exists()
    # the trap is real: the pickle calls os.mkdir (checked without unpickling it)
    with zipfile.ZipFile(path) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith(".pkl")))
    calls = [arg for op, arg, _ in pickletools.genops(pickled) if op.name == "GLOBAL"]
    assert f"{os.mkdir.__module__} mkdir" in calls


def test_seed_everything_repeats_draws():
    utils.seed_everything(3)
    a = torch.rand(3)
    utils.seed_everything(3)
    assert torch.equal(a, torch.rand(3))


def test_atomic_path_gives_umask_permissions(tmp_path):
    target = tmp_path / "out.txt"
    umask = os.umask(0o022)
    try:
        with utils.atomic_path(str(target)) as tmp:
            with open(tmp, "w") as f:
                f.write("x")
    finally:
        os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o644


HEAP_SCRIPT = """
import ctypes
import torch
import utils


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
        .split()
    ]


libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2


def a_64_mb_block():
    # MB held in mmapped blocks while a 64 MB tensor lives, and MB free in the heap after
    x = torch.ones(16 << 20)
    mapped = libc.mallinfo2().hblkhd >> 20
    del x
    return mapped, libc.mallinfo2().fordblks >> 20


print(*a_64_mb_block())
utils.keep_freed_memory()
print(*a_64_mb_block())
"""


@pytest.mark.skipif(
    utils._glibc() is None or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="mallopt and mallinfo2 are glibc's (2.33+)",
)
def test_keep_freed_memory_keeps_large_blocks_in_the_heap():
    # By default glibc maps a 64 MB block of its own and unmaps it when freed (the next one
    # page-faults in again); after keep_freed_memory it comes from the heap and stays there.
    result = subprocess.run(
        [sys.executable, "-c", HEAP_SCRIPT],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        check=True,
    )
    (mapped, kept), (mapped_after, kept_after) = (
        map(int, line.split()) for line in result.stdout.splitlines()
    )
    assert mapped >= 64 and kept < 64
    assert mapped_after < 64 and kept_after >= 64
