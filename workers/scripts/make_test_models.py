#!/usr/bin/env python3
"""Build tiny `task = "tensor"` ONNX models for tests, as model-repository entries.

Every kind takes `x` (float32, [batch, 4], batch dynamic) and returns `y`
(float32, [batch, 4]):

- `double`: y = 2 * x.
- `rows`: y = 2 * x, and a second output `rows` (float32, [batch, 1]) that
  holds the number of rows of the forward pass: it shows whether jobs ran
  concatenated in one pass (every job sees the batch's rows) or alone.
- `broken`: loads fine but fails at run time on every input. It computes
  2 * x and reshapes it to `Shape(x) + 1`, i.e. [batch + 1, 5]: that target
  is only known at run time (batch is dynamic, so onnxruntime cannot fold it
  at load time), and its element count (batch + 1) * 5 never equals
  batch * 4, not even for batch 0. It exercises the worker's handling of a
  model whose inference errors.

Output: `<out>/<name>/<version>/` holding `model.onnx`, `model.toml` and
`SHA256SUMS` (opset 17, IR version 8, checked with onnx.checker).

With `--concat-batch` the entry's model.toml declares the first axis a batch
axis (`[tensor] concat_batch = true`): a batch of jobs runs in one forward
pass.

Usage: make_test_models.py --out REPO --name NAME --version V --kind {broken,double,rows} [--concat-batch]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from repo_entry import entry_dir, finish_entry, tensor_model_toml, write_atomic

OPSET = 17
WIDTH = 4

DESCRIPTIONS = {
    "double": "test model: y = 2 * x, x and y float32 [batch, 4]; exists for tests",
    "rows": "test model: y = 2 * x, rows = the forward pass's row count, [batch, 1]; exists for tests",
    "broken": "test model: loads but fails at run time on every input "
    "(reshapes 2 * x to [batch + 1, 5]); same signature as double; exists for tests",
}


def build(kind: str) -> onnx.ModelProto:
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    nodes = [helper.make_node("Mul", ["x", "two"], ["doubled"], name="double")]
    inits = [two]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])]
    if kind == "double":
        nodes.append(helper.make_node("Identity", ["doubled"], ["y"], name="output"))
    elif kind == "rows":
        nodes.append(helper.make_node("Identity", ["doubled"], ["y"], name="output"))
        inits += [
            numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
        ]
        nodes += [
            helper.make_node("Shape", ["x"], ["x_shape"], name="shape"),
            helper.make_node("Slice", ["x_shape", "zero", "one"], ["batch"], name="batch"),
            helper.make_node("Cast", ["batch"], ["batch_f"], to=TensorProto.FLOAT, name="batch_f"),
            helper.make_node("Concat", ["batch", "one"], ["rows_shape"], axis=0, name="rows_shape"),
            helper.make_node("Expand", ["batch_f", "rows_shape"], ["rows"], name="rows"),
        ]
        outputs.append(helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["batch", 1]))
    elif kind == "broken":
        # Target shape Shape(x) + 1 = [batch + 1, 5]: computed from the input at
        # run time, and never the element count of x.
        inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "one"))
        nodes += [
            helper.make_node("Shape", ["x"], ["x_shape"], name="shape"),
            helper.make_node("Add", ["x_shape", "one"], ["bad_shape"], name="grow"),
            helper.make_node("Reshape", ["doubled", "bad_shape"], ["y"], name="reshape"),
        ]
    else:
        raise ValueError(kind)

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])
    graph = helper.make_graph(nodes, f"sluice-test-{kind}", [x], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="sluice-test")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="model repository root")
    ap.add_argument("--name", required=True)
    ap.add_argument("--version", required=True)
    ap.add_argument("--kind", required=True, choices=sorted(DESCRIPTIONS))
    ap.add_argument("--concat-batch", action="store_true", help="declare the first axis a batch axis")
    args = ap.parse_args()

    dest = entry_dir(args.out, args.name, args.version)
    data = build(args.kind).SerializeToString()
    dest.mkdir(parents=True, exist_ok=True)
    write_atomic(dest / "model.onnx", data)
    write_atomic(
        dest / "model.toml",
        tensor_model_toml(
            "make_test_models.py",
            args.name,
            args.version,
            DESCRIPTIONS[args.kind],
            ["y", "rows"] if args.kind == "rows" else ["y"],
            args.concat_batch,
        ).encode(),
    )
    # SHA256SUMS last: an entry with a SHA256SUMS file is complete.
    finish_entry(dest, ["model.onnx", "model.toml"])
    print(f"wrote {dest} ({args.kind}, {len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
