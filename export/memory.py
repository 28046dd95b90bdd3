"""What a graph holds in memory per unit of input, measured at export and stored in the contract,
so that serving knows a request's cost before it runs (services/budget.py).

The graph runs in a fresh process (``python -m export.memory <model.onnx>``), with the session
options serving uses (no CPU arena, one thread), at two sizes of its input: two image sides for a
graph whose height and width are dynamic (the unit is a pixel of one row), else two batch sizes
(the unit is a row). The peak resident memory after each run (``ru_maxrss``, a high-water mark, so
the smaller size runs first) gives the slope: bytes per unit. Before each run the kernel's
high-water mark is reset (``/proc/self/clear_refs``), so session creation's own peak hides nothing. Text models are left out: their
memory is bounded by the text engine's own limits (live rows, context window)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from common.resources import peak_above_rest
from contract import ModelContract

SIDES = (256, 768)  # image sides for graphs with dynamic height and width
ROWS = (16, 256)  # batch sizes for the others


def unit_of(contract: ModelContract) -> str | None:
    if contract.task == "text-generation":
        return None
    dynamic_image = any(d < 0 and axis in ("height", "width")
                        for spec in contract.inputs for d, axis in zip(spec.shape, spec.axis_names))
    return "pixel" if dynamic_image else "row"


def feeds_for(contract: ModelContract, rows: int, side: int) -> dict[str, np.ndarray]:
    feeds = {}
    for spec in contract.inputs:
        shape = []
        for d, axis in zip(spec.shape, spec.axis_names):
            shape.append(d if d >= 0 else rows if axis == "batch" else side if axis in ("height", "width") else 1)
        feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feeds


def measure_here(onnx_path: Path, contract: ModelContract) -> dict[str, int]:
    """In this process: {"peak_bytes_per_pixel" or "peak_bytes_per_row": n}; {} for text models."""
    import onnxruntime as ort

    unit = unit_of(contract)
    if unit is None:
        return {}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_cpu_mem_arena = False  # as serving runs it (common/runtime.py)
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    # Within the model's own limits: an imported ResNet-50 at 256 rows would need gigabytes.
    top_rows = contract.max_batch or ROWS[1]
    rows_at = (max(1, min(ROWS[0], top_rows // 4)), min(ROWS[1], top_rows))
    top_side = int(math.sqrt(contract.limits.get("max_pixels", SIDES[1] ** 2)))
    step = max(8, contract.image.multiple_of if contract.image else 1)  # sides the network accepts
    sides_at = tuple(max(step, side - side % step) for side in (min(SIDES[0], top_side // 3), min(SIDES[1], top_side)))
    sizes = [(1, side) for side in sides_at] if unit == "pixel" else [(rows, 1) for rows in rows_at]
    peaks = []
    for rows, side in sizes:
        session.run(None, feeds_for(contract, rows, side))  # once, so lazily built kernels are not counted
        peaks.append(peak_above_rest(lambda: session.run(None, feeds_for(contract, rows, side))))
    units = [side * side if unit == "pixel" else rows for rows, side in sizes]
    slope = max(0.0, (peaks[1] - peaks[0]) / (units[1] - units[0]) if units[1] > units[0] else peaks[1] / units[1])
    return {f"peak_bytes_per_{unit}": int(math.ceil(slope))}


def measure(onnx_path: Path) -> dict[str, int]:
    """``measure_here`` in a fresh process, so nothing this one allocated hides the peaks."""
    done = subprocess.run([sys.executable, "-m", "export.memory", str(onnx_path)], capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {onnx_path.name}'s memory failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    import onnx

    from contract import CONTRACT_KEY

    path = Path(sys.argv[1])
    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    contract = ModelContract.from_json(props[CONTRACT_KEY])
    del proto
    print(json.dumps(measure_here(path, contract)))


if __name__ == "__main__":
    main()
