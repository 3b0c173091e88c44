"""Packing a trained generator for shipping: float16 weights, config, checksum."""

import numpy as np
import pytest

import export_model
from inference_wav import SuperResolver
from test_inference import save_g, tiny_generator


def test_export_loads_checks_digest_and_matches_float32(tmp_path):
    generator, cfg = tiny_generator(seed=3)
    save_g(tmp_path / "g_00000007", generator, cfg)
    packed = tmp_path / "ship" / "model.pt"
    digest = export_model.export(str(tmp_path / "g_00000007"), str(packed))
    assert (tmp_path / "ship" / "model.pt.sha256").read_text().split() == [
        digest,
        "model.pt",
    ]
    audio = np.random.default_rng(0).standard_normal(4800).astype(np.float32) * 0.1
    full = SuperResolver.from_pretrained(str(tmp_path / "g_00000007"), device="cpu")
    half = SuperResolver.from_pretrained(str(packed), device="cpu")
    y_full, _ = full.upsample(audio, 48000)
    y_half, _ = half.upsample(audio, 48000)
    assert np.abs(y_half - y_full).max() < 1e-2 * np.abs(y_full).max()
    assert not np.array_equal(y_half, y_full)  # the weights really were rounded

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
    assert "not a g_ checkpoint" in capsys.readouterr().err
