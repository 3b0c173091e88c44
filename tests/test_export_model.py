"""Packing a trained generator for shipping: float16 weights (the head float32), config, checksum."""

import numpy as np
import pytest

import export_model
from inference_wav import SuperResolver
from models import load_generator
from test_inference import save_g, tiny_generator
from test_utils import booby_trap


def test_export_loads_checks_digest_and_matches_float32(tmp_path):
    generator, cfg = tiny_generator(seed=3)
    generator.zero_head_nyquist()
    save_g(tmp_path / "g_00000007", generator, cfg, step=7)
    packed = tmp_path / "ship" / "model.pt"
    digest, step = export_model.export(str(tmp_path / "g_00000007"), str(packed))
    assert step == 7
    assert (tmp_path / "ship" / "model.pt.sha256").read_text().split() == [
        digest,
        "model.pt",
    ]
    audio = np.random.default_rng(0).standard_normal(4800).astype(np.float32) * 0.1
    full = SuperResolver.from_pretrained(str(tmp_path / "g_00000007"), device="cpu")
    half = SuperResolver.from_pretrained(str(packed), device="cpu")
    # the raw output: with the input's band kept, full-band noise would come back unchanged
    y_full, _ = full.upsample(audio, 48000, keep_lowband=False)
    y_half, _ = half.upsample(audio, 48000, keep_lowband=False)
    assert np.abs(y_half - y_full).max() < 1e-2 * np.abs(y_full).max()
    assert not np.array_equal(y_half, y_full)  # the weights really were rounded
    # all but the head: its zero at 24 kHz survives the packing
    assert load_generator(str(packed))[0].head_nyquist_gain().abs().max() < 1e-6

    packed.write_bytes(packed.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="checksum mismatch"):
        SuperResolver.from_pretrained(str(packed), device="cpu")


def test_export_rejects_a_non_generator_checkpoint(tmp_path, capsys):
    bad = tmp_path / "do_00000001"
    export_model.utils.save_checkpoint(str(bad), {"mpd": {}})
    assert (
        export_model.main(
            ["--checkpoint_file", str(bad), "--output", str(tmp_path / "x.pt")]
        )
        == 1
    )
    assert "holds no generator" in capsys.readouterr().err


def test_export_refuses_pickled_code(tmp_path, capsys):
    marker = tmp_path / "payload_ran"
    good = save_g(tmp_path / "g_00000007", *tiny_generator())
    checkpoint = export_model.utils.load_checkpoint(good)
    trap = booby_trap(tmp_path / "g_trap", checkpoint, marker)
    code = export_model.main(
        ["--checkpoint_file", trap, "--output", str(tmp_path / "x.pt")]
    )
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "refusing to load" in err
    assert not marker.exists() and not (tmp_path / "x.pt").exists()


def test_export_rejects_a_malformed_generator_in_one_line(tmp_path, capsys):
    generator, cfg = tiny_generator()
    good = export_model.utils.load_checkpoint(save_g(tmp_path / "g_1", generator, cfg))
    bad = tmp_path / "g_00000001"
    export_model.utils.save_checkpoint(str(bad), {**good, "generator": {"a": "str"}})
    out = str(tmp_path / "x.pt")
    code = export_model.main(["--checkpoint_file", str(bad), "--output", out])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "named tensors" in err


def test_curve_reads_every_stretch_of_a_resumed_run(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    generator, cfg = tiny_generator(seed=3)
    save_g(tmp_path / "g_00000300", generator, cfg, step=300)
    logs = tmp_path / "logs"
    first = SummaryWriter(str(logs))
    for step, value in [(100, 1.6), (200, 1.5), (300, 1.45)]:
        first.add_scalar("validation/lsd", value, step)
        first.add_scalar("train/mel", 9.0, step)
    first.close()
    # A second stretch resumed from step 200: its step 300 replaces the first one's.
    second = SummaryWriter(str(logs), purge_step=201)
    for step, value in [(300, 1.4), (400, 1.3)]:
        second.add_scalar("validation/lsd", value, step)
    second.close()
    png = tmp_path / "docs" / "curve.png"
    png.parent.mkdir()
    code = export_model.main(
        ["--checkpoint_file", str(tmp_path / "g_00000300"), "--output", str(tmp_path / "m.pt")]
        + ["--logs", str(logs), "--curve", str(png)]
    )
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "1.600 (100), 1.500 (200), 1.400 (300), 1.300 (400)" in out
    assert "(step 300)" in out  # the exported checkpoint's step, marked on the curve


def test_curve_needs_validation_scalars(tmp_path, capsys):
    generator, cfg = tiny_generator(seed=3)
    save_g(tmp_path / "g_00000007", generator, cfg)
    (tmp_path / "logs").mkdir()
    common = ["--checkpoint_file", str(tmp_path / "g_00000007"), "--output", str(tmp_path / "m.pt")]
    assert export_model.main(common + ["--logs", str(tmp_path / "logs")]) == 1
    assert "give --logs and --curve together" in capsys.readouterr().err
    code = export_model.main(common + ["--logs", str(tmp_path / "logs"), "--curve", "c.png"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no validation/lsd scalars" in err
