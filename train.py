"""Train Wave-U-Mamba as the generator of a HiFi-GAN-style GAN (SPEC section 5).

Runs on the CPU, on one GPU, or on several GPUs or machines with DistributedDataParallel under
torchrun. The loop, the g_/do_ checkpoints and the TensorBoard tags follow jik876/hifi-gan (MIT),
except that the generator steps first and the discriminators then train on its detached output.

    python train.py --config cfgs.json --checkpoint_path runs/x [section.key=value ...]
    torchrun --nproc_per_node 2 train.py --config cfgs.json --checkpoint_path runs/x

A --checkpoint_path that already holds checkpoints resumes the run exactly where its last
checkpoint left it, down to the position inside the epoch.
"""

import argparse
import dataclasses
import datetime
import itertools
import json
import math
import os
import random
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import ssm
import stream
import utils
from dataset import TrainDataset, ValidDataset, list_audio_files, peak_gains
from losses import (
    MelLoss,
    MRSTFTLoss,
    discriminator_adv_loss,
    feature_matching_loss,
    generator_adv_loss,
)
from metrics import lsd
from models import (
    MultiPeriodDiscriminator,
    MultiScaleDiscriminator,
    WaveUMamba,
    read_generator_checkpoint,
)


@dataclasses.dataclass
class Run:
    """The state of one training process: models, optimisers, data and progress counters."""

    cfg: utils.Config
    device: torch.device
    rank: int
    world_size: int
    generator: WaveUMamba
    mpd: MultiPeriodDiscriminator
    msd: MultiScaleDiscriminator
    # The modules that compute training losses: DDP wrappers under torchrun, else the models.
    generator_ddp: nn.Module
    mpd_ddp: nn.Module
    msd_ddp: nn.Module
    optim_g: torch.optim.Optimizer
    optim_d: torch.optim.Optimizer
    sched_g: torch.optim.lr_scheduler.LambdaLR
    sched_d: torch.optim.lr_scheduler.LambdaLR
    mel_loss: MelLoss
    mrstft_loss: MRSTFTLoss
    train_set: TrainDataset
    train_sampler: DistributedSampler
    valid_set: ValidDataset | None  # rank 0 only
    step: int = 0  # optimiser steps done
    epoch: int = 0  # the epoch in progress
    epoch_step: int = 0  # batches of this epoch already trained on
    best: dict = dataclasses.field(
        default_factory=lambda: {"lsd": math.inf, "step": 0, "since_improvement": 0}
    )
    # Validation items whose input and target this process already sent to TensorBoard.
    logged_inputs: set = dataclasses.field(default_factory=set)


def lr_factor(epoch: int, train_cfg: utils.TrainConfig) -> float:
    """Learning-rate multiplier for an epoch: linear warm-up, then exponential decay."""
    if epoch < train_cfg.warmup_epochs:
        start = train_cfg.warmup_start_factor
        return start + (1.0 - start) * epoch / train_cfg.warmup_epochs
    return train_cfg.lr_decay ** (epoch - train_cfg.warmup_epochs)


def per_process_batch(train_cfg: utils.TrainConfig, world_size: int) -> int:
    """The batch each process trains on: the global train.batch_size split evenly."""
    if train_cfg.batch_size % world_size:
        raise ValueError(
            f"train.batch_size={train_cfg.batch_size} is not divisible by the "
            f"{world_size} processes"
        )
    return train_cfg.batch_size // world_size


def adamw_groups(module: nn.Module) -> list[dict]:
    """The module's parameters as AdamW parameter groups: those marked `_no_weight_decay`
    (Mamba's A_log and D) in a group of their own without weight decay, the rest in a group
    that takes the optimiser's weight decay.

    Deviation: the authors' AdamW decayed every parameter. state-spaces/mamba marks A_log and
    D `_no_weight_decay` for the optimiser to leave them alone: decay pulls every A_log to 0
    (every state's decay rate A to -1) and the skip D to 0, which is no prior on either.
    """
    params = list(module.parameters())
    kept = [p for p in params if getattr(p, "_no_weight_decay", False)]
    decayed = [p for p in params if not getattr(p, "_no_weight_decay", False)]
    return [{"params": decayed}, {"params": kept, "weight_decay": 0.0}]


def build(
    cfg: utils.Config,
    device: torch.device = torch.device("cpu"),
    rank: int = 0,
    world_size: int = 1,
    scan_impl: str = "auto",
) -> Run:
    """Builds the models, optimisers, schedulers, losses and datasets of a fresh run.

    Args:
        cfg: the full config.
        device: where this process trains.
        rank, world_size: this process's place in the process group (0, 1 without DDP); the
            process group must already be initialised when world_size > 1.
        scan_impl: selective-scan implementation for the generator's Mamba blocks.
    Returns:
        A Run at step 0. Raises ValueError for a batch size the processes cannot share or
        a training set smaller than one batch.
    """
    train_cfg = cfg.train
    per_process_batch(train_cfg, world_size)
    train_set = TrainDataset(
        list_audio_files(cfg.data.root, cfg.data.train_files), cfg, seed=train_cfg.seed
    )
    # Decoded once here: the DataLoader workers forked each epoch share this cache.
    train_set.preload()
    valid_set = None
    if rank == 0:
        valid_set = ValidDataset(
            list_audio_files(cfg.data.root, cfg.data.valid_files), cfg
        )
    # Every process draws the same initial weights; DDP would broadcast rank 0's anyway.
    utils.seed_everything(train_cfg.seed)
    generator = WaveUMamba(**dataclasses.asdict(cfg.model), scan_impl=scan_impl)
    generator = generator.to(device)
    mpd = MultiPeriodDiscriminator().to(device)
    msd = MultiScaleDiscriminator().to(device)
    adamw = dict(
        lr=train_cfg.learning_rate,
        betas=(train_cfg.adam_b1, train_cfg.adam_b2),
        weight_decay=train_cfg.weight_decay,
        # one pass over each parameter instead of a dozen: the same update, and on CPU 15x
        # faster for the discriminators' 70 M parameters (1.4 s -> 0.09 s a step)
        fused=True,
    )
    optim_g = torch.optim.AdamW(adamw_groups(generator), **adamw)
    optim_d = torch.optim.AdamW(
        itertools.chain(mpd.parameters(), msd.parameters()), **adamw
    )

    def factor(epoch):
        return lr_factor(epoch, train_cfg)

    ddp = {}
    if world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        ddp = {
            name: DistributedDataParallel(module, device_ids=device_ids)
            for name, module in (("g", generator), ("mpd", mpd), ("msd", msd))
        }
    # Shuffles identically in every process and every run: the order depends only on
    # (seed, epoch), which is what lets a resumed run see the batches it would have seen.
    train_sampler = DistributedSampler(
        train_set,
        num_replicas=world_size,
        rank=rank,
        shuffle=True,
        seed=train_cfg.seed,
    )
    run = Run(
        cfg=cfg,
        device=device,
        rank=rank,
        world_size=world_size,
        generator=generator,
        mpd=mpd,
        msd=msd,
        generator_ddp=ddp.get("g", generator),
        mpd_ddp=ddp.get("mpd", mpd),
        msd_ddp=ddp.get("msd", msd),
        optim_g=optim_g,
        optim_d=optim_d,
        sched_g=torch.optim.lr_scheduler.LambdaLR(optim_g, factor),
        sched_d=torch.optim.lr_scheduler.LambdaLR(optim_d, factor),
        mel_loss=MelLoss(cfg.loss, cfg.audio.sampling_rate).to(device),
        mrstft_loss=MRSTFTLoss(cfg.loss, cfg.audio.sampling_rate).to(device),
        train_set=train_set,
        train_sampler=train_sampler,
        valid_set=valid_set,
    )
    if steps_per_epoch(run) == 0:
        raise ValueError(
            f"train.batch_size={train_cfg.batch_size} is larger than the training set "
            f"({len(train_set)} items)"
        )
    constrain_generator(run)
    return run


def constrain_generator(run: Run) -> None:
    """Applies the weight constraints the config asks for (after init and every update)."""
    if run.cfg.train.zero_head_nyquist:
        run.generator.zero_head_nyquist()


def _batches(run: Run) -> list[list[int]]:
    """This process's batches of dataset indices for the current epoch, all of them."""
    run.train_sampler.set_epoch(run.epoch)
    indices = list(run.train_sampler)
    size = per_process_batch(run.cfg.train, run.world_size)
    return [indices[i : i + size] for i in range(0, len(indices) - size + 1, size)]


def steps_per_epoch(run: Run) -> int:
    """Optimiser steps per epoch (full batches only)."""
    return len(_batches(run))


def epoch_loader(run: Run) -> DataLoader:
    """A DataLoader over the batches of the current epoch not yet trained on."""
    run.train_set.set_epoch(run.epoch)
    # A fresh loader per epoch: its (non-persistent) workers copy the dataset after
    # set_epoch, and resuming skips finished batches without loading them.
    return DataLoader(
        run.train_set,
        batch_sampler=_batches(run)[run.epoch_step :],
        num_workers=run.cfg.data.num_workers,
        pin_memory=run.device.type == "cuda",
    )


def train_step(run: Run, batch) -> dict[str, float]:
    """One generator update, then one update of both discriminators; advances run.step.

    During the first train.discriminator_warmup_steps steps only the discriminators train (on
    the generator's output), so that a trained generator meets trained critics; during the first
    train.generator_warmup_steps steps only the generator trains, on the reconstruction losses.

    The discriminators run once a step. The generator's update comes first, so both losses see
    the same discriminator weights and the same output: the scores of that one pass serve the
    generator's adversarial loss (gradient into the generator only) and the discriminators' own
    loss (gradient into the discriminators only, the output taken as given). That is what the
    update-then-rescore order of SPEC section 6 computes, in about three quarters of the
    discriminator time (README "Speed").

    Args:
        run: the run to advance.
        batch: (x, y), low-resolution input and target, [B, 1, segment_size] each.
    Returns:
        Loss values (unweighted) and gradient norms (before clipping) as floats.
    """
    train_cfg = run.cfg.train
    x, y = (t.to(run.device, non_blocking=True) for t in batch)
    train_generator = run.step >= train_cfg.discriminator_warmup_steps
    adversarial = run.step >= train_cfg.generator_warmup_steps
    with torch.set_grad_enabled(train_generator):
        y_hat = run.generator_ddp(x)  # [B, 1, T]
    logs = {}
    if adversarial:
        # (real scores, fake scores, real feature maps, fake feature maps) of each
        mpd, msd = run.mpd_ddp(y, y_hat), run.msd_ddp(y, y_hat)
    if train_generator:
        loss_g = _generator_loss(run, y, y_hat, (mpd, msd) if adversarial else None, logs)
        run.optim_g.zero_grad(set_to_none=True)
        # inputs=: no weight gradients for the discriminators, whose graph is kept for theirs
        loss_g.backward(inputs=list(run.generator.parameters()), retain_graph=adversarial)
        grad_norm_g = nn.utils.clip_grad_norm_(
            run.generator.parameters(), train_cfg.grad_clip_g
        )
        logs.update(loss_g=loss_g.item(), grad_norm_g=grad_norm_g.item())
    if adversarial:
        loss_mpd = discriminator_adv_loss(mpd[0], mpd[1])
        loss_msd = discriminator_adv_loss(msd[0], msd[1])
        run.optim_d.zero_grad(set_to_none=True)
        # inputs=: the output is taken as given, as if detached
        (loss_mpd + loss_msd).backward(
            inputs=[*run.mpd.parameters(), *run.msd.parameters()]
        )
        grad_norm_mpd = nn.utils.clip_grad_norm_(run.mpd.parameters(), train_cfg.grad_clip_d)
        grad_norm_msd = nn.utils.clip_grad_norm_(run.msd.parameters(), train_cfg.grad_clip_d)
        logs.update(
            loss_d=(loss_mpd + loss_msd).item(),
            loss_mpd=loss_mpd.item(),
            loss_msd=loss_msd.item(),
            grad_norm_mpd=grad_norm_mpd.item(),
            grad_norm_msd=grad_norm_msd.item(),
        )
    # the optimisers step after both backward passes, which read the weights they change
    if train_generator:
        run.optim_g.step()
        constrain_generator(run)
    if adversarial:
        run.optim_d.step()
    run.step += 1
    return logs


def _generator_loss(run: Run, y, y_hat, scores, logs: dict) -> torch.Tensor:
    """The generator's weighted loss; scores: the discriminators' outputs (MPD's, MSD's) on
    (y, y_hat), or None before the GAN starts. Logs each term (unweighted) into logs."""
    loss_cfg = run.cfg.loss
    mel = run.mel_loss(y_hat, y)
    mrstft = run.mrstft_loss(y_hat, y)
    loss_g = loss_cfg.lambda_mel * mel + loss_cfg.lambda_mrstft * mrstft
    logs.update(mel=mel.item(), mrstft=mrstft.item())
    if scores is None:
        return loss_g
    adv = sum(generator_adv_loss(fake) for _, fake, _, _ in scores)
    loss_g = loss_g + loss_cfg.lambda_adv * adv
    logs["g_adv"] = adv.item()
    if loss_cfg.lambda_fm > 0:
        fm = sum(feature_matching_loss(real, fake) for _, _, real, fake in scores)
        loss_g = loss_g + loss_cfg.lambda_fm * fm
        logs["fm"] = fm.item()
    return loss_g


def _rate_name(sampling_rate: int, ratio: int) -> str:
    return f"{sampling_rate / ratio / 1000:g}k"


@torch.no_grad()
def validate(run: Run, writer: SummaryWriter | None = None, n_logged: int = 1):
    """Scores the generator on the whole validation set with LSD (SPEC section 7).

    Args:
        run: the run (rank 0, which holds the validation set).
        writer: when given, the scores go to TensorBoard as validation/*, with the audio and
            spectrograms of the first n_logged files at every ratio.
        n_logged: how many validation files to log as audio and images.
    Returns:
        {"lsd", "lsd_hf"} averaged over all items, and "lsd_<rate>", "lsd_hf_<rate>" per input
        rate (e.g. "lsd_8k").
    """
    sampling_rate = run.cfg.audio.sampling_rate
    run.generator.eval()
    scores = {}
    logged_names = []
    for x, y, ratio, name in run.valid_set:
        # Scored as users get it: inference_wav's stream processor on the whole utterance,
        # at the peak-normalising gain (the same code as evaluate.run_generator).
        gain = peak_gains(x.abs().max().item(), run.cfg.audio.peak, name)
        y_hat = torch.from_numpy(
            stream.process_whole(
                run.generator, x[0].numpy(), sampling_rate, sampling_rate, gain
            )
        )  # [T]
        item = lsd(y[0], y_hat, sampling_rate, cutoff_hz=sampling_rate / ratio / 2)
        scores.setdefault(ratio, []).append(item)
        if name not in logged_names and len(logged_names) < n_logged:
            logged_names.append(name)
        if writer is not None and name in logged_names:
            _log_audio(
                run, writer, f"{name}_{_rate_name(sampling_rate, ratio)}", x, y, y_hat
            )
    run.generator.train()

    metrics = {}
    for ratio, items in sorted(scores.items(), reverse=True):
        rate = _rate_name(sampling_rate, ratio)
        for key in ("lsd", "lsd_hf"):
            metrics[f"{key}_{rate}"] = float(np.mean([s[key] for s in items]))
    every_item = [s for items in scores.values() for s in items]
    for key in ("lsd", "lsd_hf"):
        metrics[key] = float(np.mean([s[key] for s in every_item]))
    if writer is not None:
        for key, value in metrics.items():
            writer.add_scalar(f"validation/{key}", value, run.step)
    return metrics


def _log_audio(run: Run, writer: SummaryWriter, tag: str, x, y, y_hat) -> None:
    """Writes the output's audio and spectrogram; the input's and target's once per process."""
    sampling_rate = run.cfg.audio.sampling_rate
    signals = {"output": y_hat}
    if tag not in run.logged_inputs:
        run.logged_inputs.add(tag)
        signals.update(input=x, target=y)
    for kind, signal in signals.items():
        signal = signal.reshape(-1).float()
        writer.add_audio(
            f"validation/{tag}/{kind}", signal.clamp(-1, 1), run.step, sampling_rate
        )
        # A linear frequency axis, unlike the mel loss, shows where the input's band ends.
        image = utils.power_db(signal)
        figure = utils.plot_spectrogram(image, sampling_rate=sampling_rate, vmin=-80)
        writer.add_figure(f"validation/{tag}/{kind}_spec", figure, run.step)


def _rng_states() -> dict:
    """Every RNG state as tensors and plain values, which a weights-only load accepts."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(
        numpy_state["state"]["key"].astype(np.int64)
    )
    states = {
        "python": random.getstate(),  # a tuple of ints and a float or None
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    numpy_state = dict(states["numpy"])
    numpy_state["state"] = dict(numpy_state["state"])
    numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoints(run: Run, checkpoint_path: str) -> None:
    """Writes g_<step> and do_<step> atomically and prunes the oldest beyond keep_checkpoints.

    g_ is written first: a do_ file on disk always has its g_ beside it.
    """
    config = utils.config_to_dict(run.cfg)
    utils.save_checkpoint(
        os.path.join(checkpoint_path, f"g_{run.step:08d}"),
        {"generator": run.generator.state_dict(), "config": config, "step": run.step},
    )
    utils.save_checkpoint(
        os.path.join(checkpoint_path, f"do_{run.step:08d}"),
        {
            "mpd": run.mpd.state_dict(),
            "msd": run.msd.state_dict(),
            "optim_g": run.optim_g.state_dict(),
            "optim_d": run.optim_d.state_dict(),
            "sched_g": run.sched_g.state_dict(),
            "sched_d": run.sched_d.state_dict(),
            "step": run.step,
            "epoch": run.epoch,
            "epoch_step": run.epoch_step,
            "best": dict(run.best),
            "rng": _rng_states(),
            "config": config,
        },
    )
    for prefix in ("do_", "g_"):
        utils.prune_checkpoints(checkpoint_path, prefix, run.cfg.train.keep_checkpoints)


def resume(run: Run, checkpoint_path: str) -> bool:
    """Restores the newest complete, loadable checkpoint pair in checkpoint_path.

    A newer pair that is incomplete or damaged (a file missing, empty, truncated, refused as
    unsafe or malformed) is skipped with one line on stderr saying why, and left in place.

    Returns:
        True if the run was restored, False if the folder holds no do_ checkpoint. Raises
        ValueError (one line) if it holds some but no pair loads.
    """
    do_steps = utils.checkpoint_steps(checkpoint_path, "do_")
    if not do_steps:
        return False
    steps = sorted(set(do_steps) | set(utils.checkpoint_steps(checkpoint_path, "g_")))
    skipped = []
    for step in reversed(steps):
        try:
            config = _restore(run, checkpoint_path, step)
        except ValueError as e:
            skipped.append(f"step {step}: {' '.join(str(e).split())}")
            continue
        if run.rank == 0:
            for reason in skipped:
                print(f"resume: skipped {reason} (left in place)", file=sys.stderr)
            changed = _changed_keys(config, utils.config_to_dict(run.cfg))
            if changed:
                print(
                    f"resuming with a config that differs from step {step}'s in: "
                    f"{', '.join(changed)}",
                    file=sys.stderr,
                )
        return True
    raise ValueError(
        f"{checkpoint_path}: no complete, loadable checkpoint pair to resume from "
        f"(newest: {skipped[0]})"
    )


def _restore(run: Run, checkpoint_path: str, step: int) -> dict:
    """Loads the g_/do_ pair of `step` into run and returns the config it was saved with.

    Raises ValueError, naming the file, if the pair is incomplete or either file is damaged;
    a later call with an older pair then overwrites whatever was already loaded.
    """
    g_path, do_path = (
        os.path.join(checkpoint_path, f"{prefix}{step:08d}") for prefix in ("g_", "do_")
    )
    for path, other in ((g_path, do_path), (do_path, g_path)):
        if not os.path.isfile(path):
            name, other_name = os.path.basename(path), os.path.basename(other)
            raise ValueError(f"no {name} beside {other_name}")
    # On the CPU: the RNG states must stay there; load_state_dict moves the rest.
    state, g_state = utils.load_checkpoint(do_path), utils.load_checkpoint(g_path)
    path, key = g_path, "generator"
    try:
        run.generator.load_state_dict(g_state[key])
        path = do_path
        key = "optim_g"
        _regroup_optim_g(run, state)
        for key in ("mpd", "msd", "optim_g", "optim_d", "sched_g", "sched_d"):
            getattr(run, key).load_state_dict(state[key])
        key = "step"
        if state[key] != step:
            raise ValueError(f"it holds step {state[key]}")
        key = "epoch"
        run.epoch, run.epoch_step = int(state["epoch"]), int(state["epoch_step"])
        run.step = step
        key = "best"
        run.best = dict(state[key])
        key = "rng"
        _set_rng_states(state[key])
        key = "config"
        return dict(state[key])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise ValueError(f"{path}: its '{key}' does not load ({reason})") from None


def _regroup_optim_g(run: Run, state: dict) -> None:
    """Brings a do_ file written when the generator had one AdamW group (before adamw_groups)
    to run.optim_g's groups, in place, so that such runs still resume."""
    saved, groups = state["optim_g"], run.optim_g.param_groups
    if len(saved["param_groups"]) != 1 or len(groups) == 1:
        return
    # The one saved group numbered the parameters in generator.parameters() order; the
    # optimiser numbers them group after group.
    old_index = {id(p): i for i, p in enumerate(run.generator.parameters())}
    ordered = [old_index[id(p)] for group in groups for p in group["params"]]
    (old_group,) = saved["param_groups"]
    param_groups, first = [], 0
    for group in groups:
        indices = list(range(first, first + len(group["params"])))
        param_groups.append(
            {**old_group, "params": indices, "weight_decay": group["weight_decay"]}
        )
        first += len(indices)
    state["optim_g"] = {
        "state": {
            new: saved["state"][old]
            for new, old in enumerate(ordered)
            if old in saved["state"]
        },
        "param_groups": param_groups,
    }
    # its scheduler kept one learning rate per group
    for key in ("base_lrs", "_last_lr"):
        if key in state["sched_g"]:
            state["sched_g"][key] = state["sched_g"][key] * len(groups)


def init_generator(run: Run, path: str) -> int | None:
    """Warm start: the generator's weights from a checkpoint; everything else stays fresh.

    Unlike resume, the discriminators, optimisers, schedules, step and RNG states are those of
    a new run, so a run can start from a shipped or exported generator.

    Returns:
        The step the generator was trained for, when the checkpoint records it.
    """
    state, _, step = read_generator_checkpoint(path)
    if not any(".parametrizations.weight." in k for k in state):
        raise ValueError(
            f"{path}: its weights have no weight norm (saved for inference); "
            "start from a g_ checkpoint or an exported model"
        )
    try:
        run.generator.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(
            f"{path} does not fit the model of this config: {str(e).splitlines()[-1].strip()}"
        ) from None
    constrain_generator(run)
    return step


def _changed_keys(old: dict, new: dict) -> list[str]:
    return [
        f"{section}.{key}"
        for section in new
        for key in new[section]
        if old.get(section, {}).get(key) != new[section][key]
    ]


def _patience_exhausted(run: Run) -> bool:
    # early_stop_patience 0 turns early stopping off.
    patience = run.cfg.train.early_stop_patience
    return 0 < patience <= run.best["since_improvement"]


def track_best(run: Run, metrics: dict | None, checkpoint_path: str) -> bool:
    """Records a validation: keeps the best generator as g_best and counts non-improvements.

    Args:
        run: the run; its `best` dict is updated on rank 0.
        metrics: validate()'s result on rank 0 (ignored elsewhere).
        checkpoint_path: where g_best goes.
    Returns:
        Whether to stop early, the same in every process.
    """
    stop = False
    if run.rank == 0:
        if metrics["lsd"] < run.best["lsd"]:
            run.best = {"lsd": metrics["lsd"], "step": run.step, "since_improvement": 0}
            utils.save_checkpoint(
                os.path.join(checkpoint_path, "g_best"),
                {
                    "generator": run.generator.state_dict(),
                    "config": utils.config_to_dict(run.cfg),
                    "step": run.step,
                    "lsd": metrics["lsd"],
                },
            )
        else:
            run.best["since_improvement"] += 1
        stop = _patience_exhausted(run)
    if run.world_size > 1:
        # Only rank 0 validates; the others must leave the loop with it.
        flag = torch.tensor([float(stop)], device=run.device)
        dist.broadcast(flag, src=0)
        stop = bool(flag.item())
    return stop


def train(run: Run, checkpoint_path: str) -> None:
    """Trains until cfg.train.epochs are done or validation stops improving; checkpoints at the end.

    Args:
        run: a built (and possibly resumed) run.
        checkpoint_path: folder for checkpoints and TensorBoard logs (rank 0 writes).
    """
    train_cfg = run.cfg.train
    is_main = run.rank == 0
    # While generator_warmup_steps last, optim_d has not stepped when its scheduler moves to
    # the next epoch. The warning that the schedule's first value is skipped does not apply:
    # LambdaLR computes each epoch's rate from the epoch number.
    warnings.filterwarnings(
        "ignore", r"Detected call of `lr_scheduler\.step\(\)`", UserWarning
    )
    writer = None
    if is_main:
        # purge_step hides events a killed run logged after its last checkpoint.
        writer = SummaryWriter(
            os.path.join(checkpoint_path, "logs"), purge_step=run.step + 1
        )
    total = train_cfg.epochs * steps_per_epoch(run)
    progress = tqdm(
        total=total, initial=run.step, unit="step", disable=True if run.rank else None
    )
    marks = {"stdout": (time.perf_counter(), run.step)}
    marks["summary"] = marks["stdout"]
    stop = _patience_exhausted(run)  # a run that stopped early stays stopped
    while run.epoch < train_cfg.epochs and not stop:
        for batch in epoch_loader(run):
            logs = train_step(run, batch)
            run.epoch_step += 1
            progress.update()
            progress.set_postfix(
                {k: f"{logs[k]:.3f}" for k in ("loss_g", "loss_d") if k in logs}
            )
            if is_main and run.step % train_cfg.stdout_interval == 0:
                speed = _steps_per_second(marks, "stdout", run.step)
                losses = " ".join(
                    f"{k} {v:.4f}" for k, v in logs.items() if "grad" not in k
                )
                tqdm.write(
                    f"step {run.step} epoch {run.epoch} {losses} {speed:.3g} steps/s"
                )
            if is_main and run.step % train_cfg.summary_interval == 0:
                for key, value in logs.items():
                    writer.add_scalar(f"training/{key}", value, run.step)
                writer.add_scalar(
                    "training/learning_rate",
                    run.optim_g.param_groups[0]["lr"],
                    run.step,
                )
                speed = _steps_per_second(marks, "summary", run.step)
                writer.add_scalar("training/steps_per_second", speed, run.step)
            if run.step % train_cfg.validation_interval == 0:
                metrics = validate(run, writer) if is_main else None
                if is_main:
                    tqdm.write(
                        f"step {run.step} validation lsd {metrics['lsd']:.4f} "
                        f"lsd_hf {metrics['lsd_hf']:.4f}"
                    )
                stop = track_best(run, metrics, checkpoint_path)
            if is_main and run.step % train_cfg.checkpoint_interval == 0:
                save_checkpoints(run, checkpoint_path)
            if stop:
                if is_main:
                    tqdm.write(
                        f"stopping early: no improvement in "
                        f"{train_cfg.early_stop_patience} validations"
                    )
                break
        else:
            run.epoch += 1
            run.epoch_step = 0
            run.sched_g.step()
            run.sched_d.step()
    progress.close()
    if is_main:
        save_checkpoints(run, checkpoint_path)
        writer.close()


def _steps_per_second(marks: dict, name: str, step: int) -> float:
    """Steps per second since the last call with this name, data loading included."""
    now = time.perf_counter()
    then, then_step = marks[name]
    marks[name] = (now, step)
    return (step - then_step) / max(now - then, 1e-9)


def init_distributed() -> tuple[int, int, torch.device]:
    """Reads torchrun's environment and joins the process group when there are several processes.

    Returns:
        (rank, world_size, device): (0, 1, cpu or cuda:0) without torchrun.
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        # Rank 0 validates alone while the others wait in a broadcast: allow a long validation.
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(hours=2),
        )
    return rank, world_size, device


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="Train Wave-U-Mamba for speech super-resolution."
    )
    parser.add_argument("--config", default="cfgs.json", help="JSON config")
    parser.add_argument(
        "--checkpoint_path",
        default="runs/wave_u_mamba",
        help="run folder: checkpoints, config.json, logs/; resumes if it holds checkpoints",
    )
    parser.add_argument(
        "--scan_impl",
        default="auto",
        choices=ssm.IMPLS,
        help="selective-scan implementation of the Mamba blocks",
    )
    parser.add_argument(
        "--init_generator",
        metavar="CHECKPOINT",
        help="start a new run from this generator (g_ file or exported model) with fresh "
        "discriminators and optimisers; ignored when the run folder holds checkpoints, "
        "which resume instead",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="config overrides, e.g. train.batch_size=4 data.root=/data/VCTK",
    )
    args = parser.parse_args(argv)

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    try:
        cfg = utils.load_config(args.config, args.overrides)
        # Checked before joining the process group, which would wait for absent processes.
        per_process_batch(cfg.train, world_size)
        rank, world_size, device = init_distributed()
        run = build(cfg, device, rank, world_size, args.scan_impl)
        if rank == 0:
            os.makedirs(args.checkpoint_path, exist_ok=True)
            # what a killed earlier run left half-written
            utils.remove_stale_temporaries(args.checkpoint_path)
            with utils.atomic_path(
                os.path.join(args.checkpoint_path, "config.json")
            ) as tmp:
                with open(tmp, "w") as f:
                    json.dump(utils.config_to_dict(cfg), f, indent=2)
        resumed = resume(run, args.checkpoint_path)
        init_step = None
        if args.init_generator and not resumed:
            init_step = init_generator(run, args.init_generator)
    except (ValueError, OSError) as e:
        utils.print_error(e, "train.py")
        sys.exit(1)
    if rank == 0:
        if resumed and args.init_generator:
            print(f"resuming {args.checkpoint_path}: --init_generator is not used")
        elif args.init_generator:
            trained = f" (trained {init_step} steps)" if init_step is not None else ""
            print(f"generator initialised from {args.init_generator}{trained}")
        n_params = sum(p.numel() for p in run.generator.parameters())
        print(
            f"{'resuming at step ' + str(run.step) if resumed else 'starting'}: "
            f"{world_size} process(es) on {device}, generator {n_params:,} parameters, "
            f"{steps_per_epoch(run)} steps per epoch, run folder {args.checkpoint_path}"
        )
    train(run, args.checkpoint_path)
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
