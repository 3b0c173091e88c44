"""Packs a trained generator for shipping: weights only, float16, its config, and a .sha256.

    python export_model.py --checkpoint_file runs/pretrained/g_best \
        --output checkpoints/wave_u_mamba_vctk_cpu.pt

The result loads with `inference_wav.py --checkpoint_file` (or as the default pretrained model
when written to checkpoints/), which casts the weights back to float32 and checks the digest.
"""

import argparse
import os
import sys

import models
import utils


def export(checkpoint_file: str, output: str) -> str:
    """Writes `output` and `output`.sha256 from a g_ checkpoint.

    Args:
        checkpoint_file: a g_XXXXXXXX or g_best checkpoint written by train.py.
        output: path of the packed model.
    Returns:
        The SHA-256 hex digest of the written file.
    """
    state, config, step = models.read_generator_checkpoint(checkpoint_file)
    if config is None or step is None:
        raise ValueError(f"{checkpoint_file}: not a g_ checkpoint of train.py")
    utils.config_from_checkpoint(config, checkpoint_file)
    packed = {
        # float16 halves the file; the LSD change it causes is reported in the README.
        "generator": {k: v.half() for k, v in state.items()},
        "config": config,
        "step": step,
    }
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    utils.save_checkpoint(output, packed)
    digest = utils.sha256_file(output)
    with utils.atomic_path(output + ".sha256") as tmp:
        with open(tmp, "w") as f:
            f.write(f"{digest}  {os.path.basename(output)}\n")
    return digest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint_file", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    try:
        digest = export(args.checkpoint_file, args.output)
    except (ValueError, OSError) as e:
        utils.print_error(e, "export_model.py")
        return 1
    print(f"{args.output}  sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
