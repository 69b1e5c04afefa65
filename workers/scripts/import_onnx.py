#!/usr/bin/env python3
"""Import an existing ONNX file into the model repository as a `task = "tensor"` entry.

The file is copied byte for byte to `<out>/<name>/<version>/model.onnx`; a
`model.toml` is written next to it and `SHA256SUMS` last. A tensor model takes
tensors in and returns the graph outputs named in `[tensor] outputs`, so each
name given with `--outputs` must be a graph output of tensor type (a ZipMap's
sequence-of-maps output, for instance, cannot be returned and is refused).

Models whose weights live in external data files are refused: only
`model.onnx` would be copied.

`--concat-batch` declares the graph's first axis a batch axis whose rows do
not interact (`[tensor] concat_batch = true`): the worker then runs a batch of
jobs in one forward pass. It is refused unless every graph input and output
has a dynamic first dimension.

Usage: import_onnx.py --onnx PATH --out REPO --name NAME --version V
                      [--outputs a,b] [--description TEXT] [--concat-batch]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx
import onnxruntime as ort

from repo_entry import entry_dir, finish_entry, tensor_model_toml, write_atomic


def parse_outputs(spec: str) -> list[str]:
    """`a,b` -> ["a", "b"]; empty names and duplicates are errors."""
    names = [n.strip() for n in spec.split(",")]
    if any(not n for n in names):
        raise SystemExit(f"--outputs {spec!r}: empty output name")
    if len(set(names)) != len(names):
        raise SystemExit(f"--outputs {spec!r}: an output is named twice")
    return names


def graph_output_kind(value_info: onnx.ValueInfoProto) -> str:
    """`tensor` or the kind of non-tensor type (`sequence`, `map`, ...) of a graph output."""
    kind = value_info.type.WhichOneof("value")
    return {"tensor_type": "tensor", "sequence_type": "sequence", "map_type": "map",
            "optional_type": "optional", "sparse_tensor_type": "sparse tensor"}.get(kind, str(kind))


def check_model(model: onnx.ModelProto, path: Path, outputs: list[str] | None) -> None:
    """Fail with a clear message unless the model is self-contained, loads in
    onnxruntime, and `outputs` are tensor graph outputs."""
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise SystemExit(f"{path}: weights in external data files ({', '.join(external[:3])}...) are not supported")
    # The worker's test of a model is whether onnxruntime loads it; onnx.checker
    # is stricter (it rejects e.g. old-IR graphs that onnxruntime runs fine).
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise SystemExit(f"{path}: onnxruntime cannot load it: {e}")
    if outputs is None:
        return
    kinds = {o.name: graph_output_kind(o) for o in model.graph.output}
    listing = ", ".join(f"{n} ({k})" for n, k in kinds.items())
    for name in outputs:
        if name not in kinds:
            raise SystemExit(f"{path}: no graph output named {name!r}; graph outputs: {listing}")
        if kinds[name] != "tensor":
            raise SystemExit(
                f"{path}: graph output {name!r} is a {kinds[name]}, not a tensor, and cannot be returned; "
                f"graph outputs: {listing}"
            )


def check_batch_axis(model: onnx.ModelProto, path: Path) -> None:
    """Fail unless every graph input and output has a dynamic first dimension."""
    fixed = []
    for v in list(model.graph.input) + list(model.graph.output):
        if v.name in {i.name for i in model.graph.initializer}:
            continue
        dims = v.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            fixed.append(v.name)
    if fixed:
        raise SystemExit(f"{path}: --concat-batch needs a dynamic first dimension on every input and output: {fixed}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", required=True, type=Path, help="the ONNX file to import")
    ap.add_argument("--out", required=True, type=Path, help="model repository root")
    ap.add_argument("--name", required=True)
    ap.add_argument("--version", required=True)
    ap.add_argument("--outputs", help="comma-separated graph outputs returned to clients")
    ap.add_argument("--description", help="one line for humans (default: imported from <file name>)")
    ap.add_argument("--concat-batch", action="store_true", help="the first axis is a batch axis (see above)")
    args = ap.parse_args()

    dest = entry_dir(args.out, args.name, args.version)
    try:
        data = args.onnx.read_bytes()
    except OSError as e:
        raise SystemExit(f"{args.onnx}: {e.strerror}")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf's DecodeError and friends
        raise SystemExit(f"{args.onnx}: not an ONNX model: {e}")
    outputs = parse_outputs(args.outputs) if args.outputs is not None else None
    check_model(model, args.onnx, outputs)
    if args.concat_batch:
        check_batch_axis(model, args.onnx)

    description = args.description if args.description is not None else f"imported from {args.onnx.name}"
    dest.mkdir(parents=True, exist_ok=True)
    write_atomic(dest / "model.onnx", data)
    write_atomic(
        dest / "model.toml",
        tensor_model_toml("import_onnx.py", args.name, args.version, description, outputs, args.concat_batch).encode(),
    )
    # SHA256SUMS last: an entry with a SHA256SUMS file is complete.
    finish_entry(dest, ["model.onnx", "model.toml"])
    print(f"wrote {dest} ({len(data) / 1e3:.1f} kB graph, outputs: {', '.join(outputs) if outputs else 'not set'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
