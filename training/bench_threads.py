"""Training speed alone and beside a busy core, with a fixed thread count and with the governor.

    python -m training.bench_threads [--family segment] [--seconds 40]

Each case trains the family's standard model for ``--seconds`` and prints steps/s; the busy core
is a separate process spinning in a loop (what a package install or a test run does to the
machine)."""

from __future__ import annotations

import argparse
import multiprocessing
import time


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def _steps_per_second(family_name: str, seconds: float, threads: int, governed: bool) -> tuple[float, list]:
    import torch

    from training.config import TrainConfig, build
    from training.registry import get
    from training.threads import ThreadGovernor

    family = get(family_name)
    layers = family.profiles["standard"]
    train_cfg = build(TrainConfig, layers.get("train", {}))
    cfg = build(family.config_cls, layers.get("model", {}))
    data = family.load_data(cfg, train_cfg, None, 0)
    torch.manual_seed(0)
    model = family.build(cfg).train()
    optimizers = family.optimizers(model, train_cfg)
    governor = ThreadGovernor(0, interval_s=2.0) if governed else None
    if not governed:
        torch.set_num_threads(threads)
    for _ in range(3):  # warm-up
        family.train_step(model, next(data.train_batches), optimizers, train_cfg)
    steps, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        if governor:
            governor.poll()
        family.train_step(model, next(data.train_batches), optimizers, train_cfg)
        steps += 1
    return steps / (time.monotonic() - started), governor.changes if governor else []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.bench_threads")
    parser.add_argument("--family", default="segment")
    parser.add_argument("--seconds", type=float, default=40.0)
    args = parser.parse_args(argv)
    ctx = multiprocessing.get_context("spawn")
    print(f"{args.family}, standard profile, {args.seconds:.0f} s per case")
    print("| case | threads | steps/s | thread changes (s, threads) |")
    print("| --- | --- | --- | --- |")
    for busy in (False, True):
        for label, threads, governed in (("fixed 2 threads", 2, False), ("fixed 1 thread", 1, False),
                                         ("governor", 0, True)):
            stop = ctx.Event()
            spinner = ctx.Process(target=_spin, args=(stop,), daemon=True) if busy else None
            if spinner:
                spinner.start()
                time.sleep(1.0)
            try:
                rate, changes = _steps_per_second(args.family, args.seconds, threads, governed)
            finally:
                if spinner:
                    stop.set()
                    spinner.join()
            where = "beside a busy core" if busy else "alone"
            print(f"| {where} | {label} | {rate:.2f} | {changes or ''} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
