"""Offline batch inference: any stored model through the server's own task handlers (the same
preprocessing, batching, limits and answers as its native route), without HTTP.

    python -m services.batch classify digits/ results.jsonl                  # a folder of images
    python -m services.batch classify manifest.jsonl results.jsonl --field top_k=3
    python -m services.batch denoise photos/ denoised.jsonl --field sigma=25  # PNGs in denoised-images/
    python -m services.batch generate prompts.jsonl out.jsonl                 # {"prompt": ..., "seed": ...} a line
    python -m services.batch classify manifest.parquet out.jsonl --shard 3/8  # one pod of eight

Inputs: a folder (its images, by relative path, recursively), or a manifest of one object per item
(JSON lines, or Parquet with the same columns): ``id`` (default: its position), ``image`` (a path,
relative to the manifest's folder) for image routes, and the route's fields (``top_k``, ``prompt``,
``seed``...); ``--field`` gives defaults for every item.

Output: one JSON line per item, ``{"index", "id", "model", ...the route's answer}`` (or ``error``
and ``status`` for an item the model refuses), in the order items finished (join on ``index`` or ``id``); image answers go to PNG files beside it, named by
the line. Lines are appended to per-process part files under ``<output>.partial/`` while the run
goes; the output file appears (written to a temporary name, then renamed) only when every item is
done. An interrupted run (kill -9 included) resumes where it stopped when started again with the
same arguments: a torn last line is cut off and its item run again, so no item is missing or
written twice.

``--shard K/N`` takes every N-th item from the K-th (a Kubernetes Indexed Job passes its
completion index; see deploy/batch/). ``--processes`` (default: the cores) run items side by side,
each with its own sessions, as the server's workers do."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclasses.dataclass(frozen=True)
class Item:
    index: int
    id: str
    image: Path | None
    fields: dict


def read_items(source: Path) -> Iterator[Item]:
    """A folder's images or a manifest's rows, in a fixed order (resuming depends on it)."""
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        for index, path in enumerate(files):
            yield Item(index, path.relative_to(source).as_posix(), path, {})
        return
    if source.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit("a Parquet manifest needs pyarrow: pip install 'model-serving-suite[parquet]'") from None
        rows = (row for batch in pq.ParquetFile(source).iter_batches(1024) for row in batch.to_pylist())
    else:
        rows = (json.loads(line) for line in source.open() if line.strip())
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise SystemExit(f"{source}: item {index} is not an object")
        image = row.pop("image", None)
        item_id = str(row.pop("id", index))
        yield Item(index, item_id, (source.parent / image) if image else None, row)


def parse_field(text: str) -> tuple[str, Any]:
    name, eq, raw = text.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"--field {text!r}: give name=value")
    try:
        return name, json.loads(raw)
    except ValueError:
        return name, raw  # text


def parse_shard(text: str) -> tuple[int, int]:
    index, slash, count = text.partition("/")
    if not slash or not index.isdigit() or not count.isdigit() or not 0 <= int(index) < int(count):
        raise argparse.ArgumentTypeError(f"--shard {text!r}: give K/N with 0 <= K < N")
    return int(index), int(count)


class Output:
    """The output file, its part files while the run goes, and the PNG folder."""

    def __init__(self, path: Path):
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        self.images = path.with_name(path.stem + "-images")

    def done(self) -> set[int]:
        """The indices already answered, from every part file; a torn last line is cut off first."""
        found: set[int] = set()
        for part in sorted(self.partial.glob("part-*.jsonl")):
            data = part.read_bytes()
            end = data.rfind(b"\n") + 1
            if end < len(data):  # killed mid-line: that item runs again
                os.truncate(part, end)
            for line in data[:end].splitlines():
                found.add(json.loads(line)["index"])
        return found

    def finish(self) -> int:
        """Joins the parts into the output (a temporary file, then a rename) and removes them."""
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        lines = 0
        with open(temporary, "wb") as out:
            for part in sorted(self.partial.glob("part-*.jsonl")):
                with open(part, "rb") as source:
                    for line in source:
                        out.write(line)
                        lines += 1
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.path)
        for part in self.partial.glob("part-*.jsonl"):
            part.unlink()
        self.partial.rmdir()
        return lines


def image_name(item: Item) -> str:
    stem = item.id[: -len(Path(item.id).suffix)] if Path(item.id).suffix.lower() in IMAGE_SUFFIXES else item.id
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:120]
    return f"{item.index:08d}-{safe}.png"


async def run_items(model: str, route_path: str | None, items: list[Item], defaults: dict, output: Output,
                    part: Path, concurrency: int, counter: Any) -> None:
    """One process: loads the model as a server worker does, then answers ``items``."""
    from common.files import atomic_write
    from services.config import ServingConfig
    from services.dataplane import DataPlane
    from services.errors import ServingError
    from services.repository import ModelRepository, model_store
    from services.tasks import runners_for, task_classes
    from services.tasks.base import ImageResult

    config = dataclasses.replace(ServingConfig.load(arguments={}), models=(model.partition(":")[0],),
                                 default_models=False, workers=int(os.environ.get("BATCH_PROCESSES", "1")),
                                 variant=os.environ.get("SUITE_VARIANT", "fp32"))
    repository = ModelRepository(config, model_store(config), runners=runners_for(config, lambda name: None),
                                 tasks=tuple(task_classes()))
    repository.start()
    plane = DataPlane(repository)
    not_ready = repository.not_ready()
    if not_ready:
        usage_error(f"{model}: {not_ready}")
    task = repository.contract(model.partition(":")[0]).task
    handler = plane.task(task)
    routes = {r.path: r for r in handler.routes if not r.path.endswith("_stream")}
    route = routes.get(route_path) if route_path else next(iter(routes.values()), None)
    if route is None:
        usage_error(f"{model} ({task}) has the routes {sorted(routes)}; --route {route_path} is not one")
    limit = asyncio.Semaphore(concurrency)

    async def one(item: Item, out) -> None:
        async with limit:
            line: dict[str, Any] = {"index": item.index, "id": item.id}
            try:
                image = None
                if route.body == "image":
                    if item.image is None:
                        raise ServingError("image", "this route needs an image (a folder, or an 'image' column)")
                    try:
                        image = item.image.read_bytes()
                    except OSError as exc:
                        raise ServingError("image", f"{item.image}: {exc.strerror}") from None
                answer = await plane.run_native(task, route, model, image, {**defaults, **item.fields})
                if isinstance(answer, ImageResult):
                    name = image_name(item)
                    output.images.mkdir(parents=True, exist_ok=True)
                    atomic_write(output.images / name, answer.png)  # the line below names a whole file
                    line.update(model=answer.model, image=f"{output.images.name}/{name}")
                    if answer.seed is not None:
                        line["seed"] = answer.seed
                else:
                    line.update(answer)
            except ServingError as exc:
                line.update(error=str(exc), status=exc.status)
            out.write(json.dumps(line, separators=(",", ":")) + "\n")
            with counter.get_lock():
                counter.value += 1

    with open(part, "a", buffering=1 << 16) as out:
        await asyncio.gather(*(one(item, out) for item in items))
    await repository.close()


def usage_error(message: str) -> None:
    """Exit status 2, as argparse's: the arguments are wrong, and running again will not help (the
    Indexed Job fails the shard at once instead of retrying it)."""
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(2)


def worker(args: argparse.Namespace, items: list[Item], part: Path, counter: Any) -> None:
    if sys.platform.startswith("linux"):  # dies with the parent (a kill -9 of the command takes its workers too)
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    asyncio.run(run_items(args.model, args.route, items, dict(args.field or []), Output(args.output), part,
                          args.concurrency, counter))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.batch", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("model", help="a stored model: name or name:version")
    parser.add_argument("source", type=Path, help="a folder of images, or a JSONL / Parquet manifest")
    parser.add_argument("output", type=Path, help="the JSON-lines file to write")
    parser.add_argument("--route", help="the native route to run (default: the task's first, e.g. /classify)")
    parser.add_argument("--field", type=parse_field, action="append", help="name=value for every item (JSON or text)")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), help="K/N: this run's share of the items")
    parser.add_argument("--processes", type=int, default=0, help="default: the cores")
    parser.add_argument("--concurrency", type=int, default=64, help="items in flight per process (batching)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    import multiprocessing

    from common.resources import available_cores

    output = Output(args.output)
    if args.output.exists():
        print(f"{args.output} exists: nothing to do (remove it to run again)")
        return 0
    shard, shards = args.shard
    mine = [item for item in read_items(args.source) if item.index % shards == shard]
    output.partial.mkdir(parents=True, exist_ok=True)
    done = output.done()
    todo = [item for item in mine if item.index not in done]
    processes = max(1, min(args.processes or available_cores(), len(todo) or 1))
    os.environ["BATCH_PROCESSES"] = str(processes)  # each process's sessions get cores / processes threads
    print(f"{args.model}: {len(mine)} items in shard {shard}/{shards}, {len(mine) - len(todo)} done before, "
          f"{len(todo)} to run on {processes} processes", flush=True)
    started = time.perf_counter()
    if todo:
        context = multiprocessing.get_context("spawn")  # no inherited event loop or ONNX Runtime state
        counter = context.Value("q", 0)
        stamp = f"{int(time.time())}-{os.getpid()}"  # a resumed run appends to new part files
        children = [context.Process(target=worker, args=(args, todo[p::processes],
                                                         output.partial / f"part-{stamp}-{p}.jsonl", counter))
                    for p in range(processes)]
        for child in children:
            child.start()
        progress = None
        if not args.quiet:
            from tqdm import tqdm  # training's dependency; the serving image runs the command with --quiet

            progress = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="item", smoothing=0.1)
        while any(child.is_alive() for child in children):
            time.sleep(0.25)
            if progress is not None:
                progress.n = len(mine) - len(todo) + counter.value
                progress.refresh()
        if progress is not None:
            progress.close()
        failed = [child.exitcode for child in children if child.exitcode]
        if 2 in failed:
            return 2
        if failed:
            print(f"a process failed (exit {failed}); run the same command again to resume", file=sys.stderr)
            return 1
    elapsed = time.perf_counter() - started
    lines = output.finish()
    if lines != len(mine):
        print(f"{args.output}: {lines} lines for {len(mine)} items", file=sys.stderr)
        return 1
    rate = len(todo) / elapsed if elapsed > 0 else 0.0
    print(f"{args.output}: {lines} items ({len(todo)} run now in {elapsed:.1f} s: {rate:.1f} items/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
