"""model.onnx: the embedding network as float32 ONNX, written from either Keras backend.

The file takes preprocessed pixels, as the SavedModel's `serve` signature does:

    input   "images"      float32 [N, S, S, 3], NHWC, preprocessed as model.json "preprocessing" says
                          (`preprocess.preprocess_array`, or `tf_input.preprocess_image` in TensorFlow:
                          centre crop, resize to S x S, scale to [-1, 1])
    output  "embeddings"  float32 [N, D], L2-normalised

Keras converts the model through tf2onnx (`model.export(format="onnx")`), which
needs the TensorFlow backend. A model built on another backend (JAX) is
converted from its model.keras file, which is backend-neutral, in a child
Python with KERAS_BACKEND=tensorflow:

    python -m facenet_kfp.onnx_export MODEL_KERAS OUT_ONNX

`onnx_entry` describes a written file for model.json's "onnx" key.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from facenet_kfp.errors import FacenetError, InputError

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
BATCH_DIM = "N"          # the symbolic batch dimension of the input and output
# ONNX operator set of the file: the default of tf2onnx 1.17, run by every ONNX Runtime since 1.10.
OPSET = 15
LAYOUT = "NHWC"
SUBPROCESS_TIMEOUT_S = 1800
STDERR_TAIL = 3000       # characters of a failed child's stderr quoted in the error


def why_no_onnx() -> str | None:
    """None when this Python can write model.onnx (TensorFlow, tf2onnx and onnx import), else why not
    (for model.json's onnx_missing and the log)."""
    try:
        import onnx  # noqa: F401
        import tensorflow  # noqa: F401
        import tf2onnx  # noqa: F401
    except ImportError as exc:
        return (f"TensorFlow, tf2onnx or onnx is not importable where the model was saved ({exc}); "
                f"`KERAS_BACKEND=tensorflow python -m facenet_kfp.onnx_export model.keras {ONNX_FILE}` writes "
                f"it where they are installed")
    return None


def export_onnx(model: Any, model_file: str | os.PathLike, path: str | os.PathLike) -> None:
    """Write `model` as float32 ONNX at `path` (see module docstring).

    Args:
        model: the Keras embedding model, float32 (one input [None, S, S, 3], one output [None, D]).
        model_file: `model` saved as a .keras file; converted in a child Python with
            KERAS_BACKEND=tensorflow when this process runs another Keras backend.
        path: the .onnx file to write. Not atomic on its own: callers write into a temporary folder
            (fsutil.atomic_dir).

    Raises InputError for a model that does not compute in float32 (mixed precision; `check_float32`),
    FacenetError when the child Python fails (with the end of its stderr).
    """
    import keras

    if keras.backend.backend() == "tensorflow":
        convert(model, path)
    else:
        convert_file(model_file, path)


def check_float32(model: Any) -> None:
    """InputError naming the layers of `model` that do not compute in float32 (a mixed-precision model)."""
    other = [f"{layer.name} ({layer.compute_dtype})" for layer in model.layers if layer.compute_dtype != "float32"]
    if other:
        raise InputError(f"model {model.name}: model.keras and model.onnx hold a float32 model; layers computing in "
                         f"another dtype: {', '.join(other[:5])}{' ...' if len(other) > 5 else ''} (build it "
                         f"under the float32 dtype policy and copy the weights, as train's evaluation model does)")


def convert(model: Any, path: str | os.PathLike) -> None:
    """Convert `model` to ONNX at `path` on the TensorFlow backend: input "images", output "embeddings".

    Raises InputError for a model that does not compute in float32, or whose input is not
    [None, S, S, 3] or whose output is not [None, D].
    """
    import onnx
    import tensorflow as tf

    check_float32(model)
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[0] is not None or shape[3] != 3 or len(model.output_shape) != 2:
        raise InputError(f"model {model.name}: the ONNX export takes one [None, S, S, 3] input and one [None, D] "
                         f"output, got {model.input_shape} -> {model.output_shape}")
    spec = tf.TensorSpec([None, *shape[1:]], tf.float32, name=INPUT_NAME)
    converter_log = logging.getLogger("tf2onnx")       # a dozen INFO lines per conversion
    level = converter_log.level
    converter_log.setLevel(logging.WARNING)
    try:
        model.export(str(path), format="onnx", verbose=False, input_signature=[spec], opset_version=OPSET)
    finally:
        converter_log.setLevel(level)
    # tf2onnx names the output after the traced graph's tensor ("Identity:0") and the batch dimension
    # "unk__<n>"; give them the names model.json documents.
    proto = onnx.load(str(path))
    graph = proto.graph
    _rename_tensor(graph, graph.output[0].name, OUTPUT_NAME)
    for value in (graph.input[0], graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = BATCH_DIM
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _rename_tensor(graph: Any, old: str, new: str) -> None:
    """Rename tensor `old` to `new` wherever an ONNX graph names it (node inputs and outputs, graph
    outputs, value infos)."""
    for node in graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name == old:
                    names[i] = new
    for value in (*graph.output, *graph.value_info):
        if value.name == old:
            value.name = new


def convert_file(model_file: str | os.PathLike, path: str | os.PathLike,
                 timeout_s: float = SUBPROCESS_TIMEOUT_S) -> None:
    """Convert a .keras file to ONNX at `path` in a child Python on the TensorFlow backend
    (`python -m facenet_kfp.onnx_export`).

    The child sees no GPU: converting is CPU work, and the calling process (a JAX trainer) may hold
    the accelerator's memory. Raises FacenetError with the end of the child's stderr when it fails
    or runs past `timeout_s`.
    """
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "CUDA_VISIBLE_DEVICES": "",
           "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    argv = [sys.executable, "-m", "facenet_kfp.onnx_export", str(model_file), str(path)]
    command = f"KERAS_BACKEND=tensorflow python -m facenet_kfp.onnx_export {model_file} {path}"
    log.info("converting %s to ONNX in a child Python on the TensorFlow backend", model_file)
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or "")
        raise FacenetError(f"{model_file}: the ONNX export ({command}) ran past {timeout_s:.0f} s; "
                           f"its stderr ends: {tail[-STDERR_TAIL:]}") from exc
    if done.returncode != 0:
        raise FacenetError(f"{model_file}: the ONNX export ({command}) failed with exit status "
                           f"{done.returncode}; its stderr ends: {done.stderr[-STDERR_TAIL:]}")
    if not Path(path).is_file():
        raise FacenetError(f"{model_file}: the ONNX export exited 0 but wrote no {path}")


def onnx_entry(path: str | os.PathLike, preprocessing: dict[str, Any]) -> dict[str, Any]:
    """model.json's "onnx" entry for the file at `path`: {file, input: {name, shape, layout, dtype},
    output: {name, shape, dtype}, preprocessing, opset}, read from the file itself.

    Raises FacenetError when the file is not what `convert` writes: one float32 [N, S, S, 3] input named
    "images" (S = preprocessing image_size), one float32 [N, D] output named "embeddings", no float16 or
    bfloat16 weights or casts.
    """
    import onnx

    proto = onnx.load(str(path))
    graph = proto.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise FacenetError(f"{path}: expected one input and one output, got {len(graph.input)} and "
                           f"{len(graph.output)}")
    (source,), (result,) = graph.input, graph.output
    input_shape, output_shape = _shape(source), _shape(result)
    size = int(preprocessing["image_size"])
    if source.name != INPUT_NAME or input_shape != [None, size, size, 3]:
        raise FacenetError(f"{path}: input {source.name!r} {input_shape}, expected {INPUT_NAME!r} "
                           f"[None, {size}, {size}, 3]")
    if result.name != OUTPUT_NAME or len(output_shape) != 2 or output_shape[0] is not None:
        raise FacenetError(f"{path}: output {result.name!r} {output_shape}, expected {OUTPUT_NAME!r} [None, D]")
    half = _half_precision(graph)
    dtypes = {_dtype(source), _dtype(result)}
    if dtypes != {"float32"} or half:
        raise FacenetError(f"{path}: not a float32 model: input/output {sorted(dtypes)}, half precision in "
                           f"{half[:5]}")
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return {"file": Path(path).name,
            "input": {"name": INPUT_NAME, "shape": input_shape, "layout": LAYOUT, "dtype": "float32"},
            "output": {"name": OUTPUT_NAME, "shape": output_shape, "dtype": "float32"},
            "preprocessing": dict(preprocessing),
            "opset": int(opset)}


def _shape(value: Any) -> list[int | None]:
    """The shape of an ONNX graph input or output, None for a symbolic dimension."""
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


def _dtype(value: Any) -> str:
    import onnx

    return str(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))


def _half_precision(graph: Any) -> list[str]:
    """Names of the weights and Cast nodes of `graph` in float16 or bfloat16."""
    import onnx

    half = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    names = [t.name for t in graph.initializer if t.data_type in half]
    names += [node.name for node in graph.node if node.op_type == "Cast"
              and any(a.name == "to" and a.i in half for a in node.attribute)]
    return names


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m facenet_kfp.onnx_export MODEL_KERAS OUT_ONNX`: convert a .keras file on the TensorFlow
    backend (set KERAS_BACKEND=tensorflow). Exit status 0 when written, 1 with a message on stderr for an
    input it cannot convert."""
    parser = argparse.ArgumentParser(prog="python -m facenet_kfp.onnx_export",
                                     description="Convert a Keras embedding model file to float32 ONNX.")
    parser.add_argument("model_keras", help="the .keras file (a model folder's model.keras)")
    parser.add_argument("out_onnx", help="the .onnx file to write")
    args = parser.parse_args(argv)
    import keras

    import facenet_kfp.model  # noqa: F401  (registers L2Normalize, which older model files end in)

    if keras.backend.backend() != "tensorflow":
        print(f"KERAS_BACKEND={keras.backend.backend()}: the ONNX export runs on the tensorflow backend; "
              f"set KERAS_BACKEND=tensorflow", file=sys.stderr)
        return 1
    try:
        model = keras.saving.load_model(args.model_keras, compile=False)
        convert(model, args.out_onnx)
    except (InputError, OSError, ValueError) as exc:
        print(f"{args.model_keras}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
