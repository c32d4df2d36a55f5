"""Publish a finished run on the Hugging Face Hub: its model files, config.yaml, summary.json and a model card.

The repository's root holds what loads without peftlab where that exists: a LoRA run's peft adapter
(``PeftModel.from_pretrained(base, repo)``), a full or partial run's whole model
(``AutoModel*.from_pretrained(repo)``); bottleneck adapters and fused-slice LoRA have only
``trainable.safetensors``, which peftlab rebuilds (the card says so). The files are gathered as links
in a temporary folder, with the card written there, and sent by ``huggingface_hub``'s
``create_repo`` + ``upload_folder`` in one commit; ``dry_run`` lists them and touches no network.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    HTTPError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
)
from huggingface_hub.utils import validate_repo_id

from peftlab.config import RunConfig
from peftlab.errors import UserError
from peftlab.run.finished import CONFIG_FILE, check_finished
from peftlab.run.summary import SUMMARY_FILE, Artifact, RunSummary

CARD_FILE = "README.md"
_HUB_ERRORS = (HfHubHTTPError, HTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled, HFValidationError)


@dataclass
class PushPlan:
    """What a push sends: (path in the repository, local file) pairs, and the model card's text."""

    repo: str
    private: bool
    files: list[tuple[str, Path]]
    card: str

    def lines(self) -> list[str]:
        """One line per file, as ``peftlab push --dry-run`` prints them."""
        rows = [(name, path.stat().st_size) for name, path in self.files] + [(CARD_FILE, len(self.card.encode()))]
        return [f"{name}  ({size:,} bytes)" for name, size in sorted(rows)]


def plan_push(run_dir: str | Path, repo: str, private: bool = False) -> PushPlan:
    """The files a push of the completed run in ``run_dir`` to ``repo`` would upload (nothing is sent)."""
    run_dir = Path(run_dir)
    try:
        validate_repo_id(repo)
    except HFValidationError as error:
        raise UserError(f"--repo {repo!r} is not a Hub repository id (owner/name): {error}") from None
    config, summary, artifact = check_finished(run_dir)
    folder = artifact.model_path or (artifact.path if artifact.format == "peft" else None)
    if folder is not None:
        files = [(p.relative_to(run_dir / folder).as_posix(), p) for p in sorted((run_dir / folder).rglob("*"))
                 if p.is_file()]
    else:
        files = [(artifact.path, run_dir / artifact.path)]
    files += [(CONFIG_FILE, run_dir / CONFIG_FILE), (SUMMARY_FILE, run_dir / SUMMARY_FILE)]
    return PushPlan(repo, private, files, model_card(config, summary, artifact, repo))


def push_run(run_dir: str | Path, repo: str, *, private: bool = False, dry_run: bool = False) -> PushPlan:
    """Create ``repo`` (kept if it exists) and upload the run in one commit; ``dry_run``: only plan it."""
    plan = plan_push(run_dir, repo, private)
    if dry_run:
        return plan
    with tempfile.TemporaryDirectory(prefix="peftlab-push-") as staging:
        _stage(plan, Path(staging))
        try:
            api = HfApi()
            api.create_repo(repo, private=private, exist_ok=True)
            api.upload_folder(repo_id=repo, folder_path=staging, commit_message=f"peftlab run {Path(run_dir).name}")
        except _HUB_ERRORS as error:
            raise UserError(f"push to {repo} failed: {_first_line(error)}") from None
    return plan


def _stage(plan: PushPlan, staging: Path) -> None:
    """The upload's folder: links to the run's files (a copy where links are refused), and the card."""
    for name, path in plan.files:
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(path.resolve(), target)
        except OSError:
            shutil.copy2(path, target)
    (staging / CARD_FILE).write_text(plan.card, encoding="utf-8")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def model_card(config: RunConfig, summary: RunSummary, artifact: Artifact, repo: str) -> str:
    """The repository's README.md: what was trained, how it scored, and how to load it."""
    library = "peft" if artifact.format == "peft" else "transformers" if artifact.model_path else "peftlab"
    metrics = "\n".join(f"| {key} | {value:.4g} |" for key, value in summary.metrics.items()
                        if isinstance(value, (int, float)))
    header = ["---", f"library_name: {library}", *([f"base_model: {config.model}"] if _hub_id(config.model) else []),
              "tags:", "- peftlab", f"- {config.method.name}", "---", ""]
    params = summary.params
    trained = f"{params.trainable:,} of {params.total:,} parameters ({params.percent:.3f}%)" if params else "-"
    body = [f"# {summary.name}", "",
            f"Fine-tuned with peftlab from `{config.model}`: method `{config.method.name}`, "
            f"task `{config.task}`, data `{config.data.source}`, {trained} trained.", "",
            "| metric | value |", "|---|---|", metrics, "",
            "Metrics are the run's own evaluation on its eval split (see summary.json for the data, seeds and "
            "environment, and config.yaml for every setting).", "", "## Loading", "", _loading(artifact, config, repo)]
    return "\n".join(header + body) + "\n"


def _hub_id(model: str) -> bool:
    """Whether the base model is named by a hub id (owner/name), not a local folder or an embedded alias."""
    return model.count("/") == 1 and not model.startswith((".", "/", "~")) and not Path(model).exists()


def _loading(artifact: Artifact, config: RunConfig, repo: str) -> str:
    auto = "AutoModelForSequenceClassification" if config.task == "classification" else "AutoModelForCausalLM"
    if artifact.format == "peft":
        return (f"```python\nfrom peft import PeftModel\nfrom transformers import {auto}\n\n"
                f"base = {auto}.from_pretrained(\"{config.model}\")\n"
                f"model = PeftModel.from_pretrained(base, \"{repo}\")\n```")
    if artifact.model_path:
        return f"```python\nfrom transformers import {auto}\n\nmodel = {auto}.from_pretrained(\"{repo}\")\n```"
    return ("`trainable.safetensors` holds only the trained parameters (bottleneck adapters or fused-slice LoRA, "
            "which neither peft nor transformers can express). peftlab rebuilds the model: download this "
            "repository into a folder and call `peftlab.run.finished.load_finished(folder)`; the base model "
            f"`{config.model}` must be where config.yaml names it.")
