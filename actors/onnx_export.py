"""A sentence-transformers model as an ONNX file for onnxruntime: exported once, offline, and cached.

Only the transformer goes into the graph; its output is the token embeddings, and `OnnxEmbedder`
(actors/embedder.py) does the mean pooling and the L2 normalisation in numpy, as the model's
`1_Pooling` and `2_Normalize` modules do. The tokenizer is the model's own fast tokenizer, saved
beside the graph as `tokenizer.json` with the model's truncation (`max_seq_length`, 256 word
pieces for all-MiniLM-L6-v2) and padding to the longest text of a batch, as sentence-transformers
pads. Reading it needs only the `tokenizers` library: a process that encodes with onnxruntime
never imports torch.

    <cache_dir>/models/<key>/
        manifest.json   kind "onnx-encoder", model, dim, max_seq_length, variant, checksums
        model.onnx      the transformer: input_ids, attention_mask[, token_type_ids] -> token embeddings
        tokenizer.json  the model's fast tokenizer, truncation and padding set

The key covers the bytes of every file in the model directory, the variant (`fp32`, or `int8`:
dynamic int8 quantization of the fp32 graph) and the export's own format, so another model, or
the same name with other weights, never reuses an export. The directory is written by
`actors.index.load_or_build`: into a temporary directory, then renamed into place.

The export needs torch and sentence-transformers. `export_model` runs it in a child process
(`python -m actors.onnx_export`), so that the replica asking for it keeps torch out of its memory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

from actors.errors import RetrieverFailed
from actors.index import default_cache_dir, load_or_build

logger = logging.getLogger("ragfan")

Variant = Literal["fp32", "int8"]
EXPORT_FORMAT = 1  # part of the key: a change to how the graph is exported must not reuse old files
OPSET = 17
MODEL_FILE, TOKENIZER_FILE = "model.onnx", "tokenizer.json"


def model_digest(location: Path) -> str:
    """A sha256 over the names and bytes of every file under a model directory."""
    digest = hashlib.sha256()
    for path in sorted(p for p in location.rglob("*") if p.is_file()):
        digest.update(path.relative_to(location).as_posix().encode() + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def local_model_dir(location: str | Path) -> Path:
    """The local directory of a model: `location` itself, or a hub name's snapshot in the Hugging Face
    cache (never downloaded: the export runs offline)."""
    if Path(location).is_dir():
        return Path(location)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(location), local_files_only=True))
    except Exception as exc:
        raise RetrieverFailed(
            f"the onnx encoder backend exports a local model, and {str(location)!r} is neither a directory nor "
            "in the Hugging Face cache; point `model` at a local sentence-transformers directory, or set "
            "`encoder.backend: torch`"
        ) from exc


def export_dir(location: str | Path, variant: Variant = "fp32", *, cache_dir: Path | None = None) -> Path:
    """Where the export of the model at `location` lives."""
    blob = json.dumps({"model_sha256": model_digest(local_model_dir(location)), "variant": variant,
                       "format": EXPORT_FORMAT})
    return (cache_dir or default_cache_dir()) / "models" / hashlib.sha256(blob.encode()).hexdigest()[:16]


def export_model(
    location: str | Path, variant: Variant = "fp32", *, cache_dir: Path | None = None
) -> tuple[Path, dict[str, Any], bool]:
    """The cached export of the model at `location`, made now if absent.

    Returns (its directory, its manifest, whether it was exported by this call). The export runs
    in a child process; a second caller, here or in another replica, finds it done.
    """
    location = local_model_dir(location)
    target = export_dir(location, variant, cache_dir=cache_dir)
    # int8 quantizes the fp32 export, so that comes first (or is found done).
    fp32 = [] if variant == "fp32" else ["--fp32", str(export_model(location, "fp32", cache_dir=cache_dir)[0])]

    def build(tmp: Path) -> dict[str, Any]:
        command = [sys.executable, "-m", "actors.onnx_export", str(location), str(tmp), "--variant", variant, *fp32]
        logger.info("exporting %s to ONNX (%s) at %s, once", location, variant, target)
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            raise RetrieverFailed(
                f"exporting {location} to ONNX failed (exit {done.returncode}): {done.stderr.strip()[-800:]}; "
                "set `encoder.backend: torch` to run the model without ONNX"
            )
        fields: dict[str, Any] = json.loads((tmp / "export.json").read_text())
        (tmp / "export.json").unlink()
        return fields

    manifest, built = load_or_build(target, build=build, load=lambda d, m: m)
    return target, manifest, built


# -- the export itself, in the child process ----------------------------------------------------
def _export_fp32(location: Path, out: Path) -> dict[str, Any]:
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(location), device="cpu")
    parts: list[Any] = list(model)
    modules = [type(m).__name__ for m in parts]
    pooling = parts[1].get_config_dict() if len(parts) > 1 else {}
    # sentence-transformers 6 writes `pooling_mode: mean`; older versions a flag per mode.
    mean = pooling.get("pooling_mode") == "mean" or (
        "pooling_mode" not in pooling and pooling.get("pooling_mode_mean_tokens")
        and not any(v for k, v in pooling.items() if k.startswith("pooling_mode_") and k != "pooling_mode_mean_tokens")
    )
    supported = modules[:2] == ["Transformer", "Pooling"] and set(modules) <= {"Transformer", "Pooling", "Normalize"}
    if not (supported and mean):
        raise SystemExit(f"{location}: the onnx backend runs Transformer -> mean Pooling [-> Normalize] models; "
                         f"this one is {' -> '.join(modules)} (pooling {pooling})")
    if not model.max_seq_length:
        raise SystemExit(f"{location}: the model does not say its max_seq_length")
    transformer = parts[0].auto_model.eval()
    tokenizer = model.tokenizer
    inputs = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in tokenizer.model_input_names]

    class TokenEmbeddings(torch.nn.Module):
        """The transformer alone, taking its inputs by position (what torch.onnx.export feeds)."""

        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self.transformer(**dict(zip(inputs, tensors, strict=True))).last_hidden_state

    sample = tokenizer(["an example text to trace", "another"], padding=True, return_tensors="pt")
    axes = {name: {0: "batch", 1: "tokens"} for name in inputs}
    with torch.no_grad():
        # The TorchScript exporter (dynamo=False): it needs no onnxscript, and takes dynamic_axes.
        torch.onnx.export(
            TokenEmbeddings(), tuple(sample[name] for name in inputs), str(out / MODEL_FILE),
            input_names=inputs, output_names=["token_embeddings"],
            dynamic_axes={**axes, "token_embeddings": {0: "batch", 1: "tokens"}},
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
    # The model's own fast tokenizer, as sentence-transformers calls it: truncated to max_seq_length,
    # padded to the longest text of the batch (the file it ships may pad every text to 128).
    fast = tokenizer.backend_tokenizer
    fast.enable_truncation(max_length=model.max_seq_length)
    fast.enable_padding(pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
    fast.save(str(out / TOKENIZER_FILE))
    dim = model.get_embedding_dimension()
    return {"kind": "onnx-encoder", "model": str(location), "dim": int(dim or 0), "inputs": inputs,
            "max_seq_length": int(model.max_seq_length), "normalize": "Normalize" in modules,
            "opset": OPSET, "torch": torch.__version__}


def _quantize(fp32: Path, out: Path) -> None:
    """Dynamic int8 quantization of the weights of the fp32 graph (onnxruntime.quantization)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(fp32 / MODEL_FILE, out / MODEL_FILE, weight_type=QuantType.QInt8)
    shutil.copy(fp32 / TOKENIZER_FILE, out / TOKENIZER_FILE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a sentence-transformers model directory to ONNX "
                                     "(ragfan runs this itself, once per model; see actors/onnx_export.py).")
    parser.add_argument("model", help="a local sentence-transformers model directory")
    parser.add_argument("out", help="an empty directory to write model.onnx, tokenizer.json and export.json to")
    parser.add_argument("--variant", choices=("fp32", "int8"), default="fp32")
    parser.add_argument("--fp32", help="int8: the fp32 export to quantize")
    args = parser.parse_args(argv)
    location, out = Path(args.model), Path(args.out)
    if args.variant == "fp32":
        fields = _export_fp32(location, out)
    elif args.fp32 is None:
        parser.error("--variant int8 needs --fp32 DIR, the fp32 export to quantize")
    else:
        fp32 = Path(args.fp32)
        _quantize(fp32, out)
        manifest = json.loads((fp32 / "manifest.json").read_text())
        own = ("files", "build_seconds", "built_at", "format_version")  # load_or_build writes these anew
        fields = {k: v for k, v in manifest.items() if k not in own}
        fields["quantization"] = "dynamic int8 (weights QInt8)"
    (out / "export.json").write_text(json.dumps({**fields, "variant": args.variant}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
