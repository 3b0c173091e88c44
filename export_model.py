"""Packs a trained generator for shipping: weights only, float16 (the head float32), its config,
and a .sha256.

    python export_model.py --checkpoint_file runs/pretrained/g_best \
        --output checkpoints/wave_u_mamba_vctk_cpu.pt \
        --logs runs/pretrained/logs --curve docs/model_curve.png

The result loads with `inference_wav.py --checkpoint_file` (or as the default pretrained model
when written to checkpoints/), which casts the weights back to float32 and checks the digest.
With --logs and --curve it also draws the run's training curve for the model card: validation
LSD against step, from the TensorBoard events train.py wrote.
"""

import argparse
import os
import sys

import models
import utils


def export(checkpoint_file: str, output: str) -> tuple[str, int]:
    """Writes `output` and `output`.sha256 from a g_ checkpoint.

    Args:
        checkpoint_file: a g_XXXXXXXX or g_best checkpoint written by train.py.
        output: path of the packed model.
    Returns:
        The SHA-256 hex digest of the written file and the step the generator was trained for.
    """
    state, config, step = models.read_generator_checkpoint(checkpoint_file)
    if config is None or step is None:
        raise ValueError(f"{checkpoint_file}: not a g_ checkpoint of train.py")
    utils.config_from_checkpoint(config, checkpoint_file)
    packed = {
        # float16 halves the file; the LSD change it causes is reported in the README. The head
        # stays float32: float16 rounding would undo its zero at 24 kHz (train.zero_head_nyquist)
        # and raise the output's level there by about 9 dB.
        "generator": {k: v if k.startswith("head.") else v.half() for k, v in state.items()},
        "config": config,
        "step": step,
    }
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    utils.save_checkpoint(output, packed)
    digest = utils.sha256_file(output)
    with utils.atomic_path(output + ".sha256") as tmp:
        with open(tmp, "w") as f:
            f.write(f"{digest}  {os.path.basename(output)}\n")
    return digest, step


def validation_curve(log_dir: str, tag: str = "validation/lsd") -> list[tuple[int, float]]:
    """(step, value) of one TensorBoard scalar, sorted by step, from every event file of a
    train.py logs folder (one per stretch of a resumed run; a step logged twice keeps its
    last value). Raises ValueError when the folder holds no such scalar."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    if tag not in accumulator.Tags()["scalars"]:
        raise ValueError(f"{log_dir}: no {tag} scalars (is it a train.py logs folder?)")
    by_step = {event.step: event.value for event in accumulator.Scalars(tag)}
    return sorted(by_step.items())


def plot_curve(log_dir: str, png: str, exported_step: int) -> list[tuple[int, float]]:
    """Draws validation LSD against step from a train.py logs folder into png (atomically),
    marking the exported step when it was validated; returns the plotted points."""
    points = validation_curve(log_dir)
    plt = utils.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps, values = zip(*points)
    ax.plot(steps, values, marker="o")
    if exported_step in steps:
        value = values[steps.index(exported_step)]
        ax.plot([exported_step], [value], marker="o", color="C3", markersize=9, zorder=3)
        ax.annotate(
            f"exported: step {exported_step} ({value:.3f})",
            (exported_step, value),
            textcoords="offset points",
            xytext=(8, 4),
            ha="left",
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("validation LSD")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with utils.atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return points


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint_file", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--logs", help="the run's TensorBoard folder (train.py's <run>/logs)")
    parser.add_argument("--curve", help="with --logs: PNG of validation LSD against step")
    args = parser.parse_args(argv)
    if (args.logs is None) != (args.curve is None):
        utils.print_error(ValueError("give --logs and --curve together"), "export_model.py")
        return 1
    try:
        digest, step = export(args.checkpoint_file, args.output)
        points = plot_curve(args.logs, args.curve, step) if args.logs else []
    except (ValueError, OSError) as e:
        utils.print_error(e, "export_model.py")
        return 1
    print(f"{args.output}  sha256 {digest}  (step {step})")
    if points:
        listed = ", ".join(f"{v:.3f} ({s})" for s, v in points)
        print(f"{args.curve}: validation LSD (step) {listed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
