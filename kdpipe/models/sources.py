"""Weights from outside a job: a state dict read from a file (never unpickled code), torchvision's and timm's hub
files (with the input their configs state), and the fit of any of them to the model a stage starts from.

A checkpoint is read as tensors only: `.safetensors`, or a `.pt`/`.pth`/`.bin` file through
`torch.load(weights_only=True)`, which refuses pickled code. The usual training-script layouts are unwrapped:
`{"state_dict": ...}`, `{"model": ...}` and DataParallel's or `torch.compile`'s key prefixes.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from kdpipe.errors import UserError
from kdpipe.models.inputs import ModelInput

STATE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
WRAPPERS = ("state_dict", "model", "model_state_dict", "module", "net")  # where training scripts put the weights
PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DistributedDataParallel's, torch.compile's
SHOWN = 4  # keys named in a mismatch's line


def file_digest(path: Path) -> str:
    """The file's content as a sha256 digest: what a stage's fingerprint holds of imported weights."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict a weights file holds, unwrapped; one line naming the file when it holds none."""
    if path.suffix not in STATE_SUFFIXES:
        raise UserError(f"{path}: expected a {', '.join(STATE_SUFFIXES)} weights file")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch names the first class it refused to unpickle
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"a pickled {found[1]}" if found else "pickled objects"
        raise UserError(f"{path}: holds {what}, which kdpipe never unpickles; save model.state_dict()") from None
    except (SafetensorError, RuntimeError, EOFError) as err:
        detail = str(err).strip().splitlines()[0][:160]
        raise UserError(f"{path}: not a weights file kdpipe can read ({detail})") from None
    return unwrap(loaded, path)


def unwrap(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: the mapping itself, or the one under a usual wrapper key, prefixes stripped."""
    while isinstance(loaded, dict) and not is_state(loaded):
        inner = next((loaded[key] for key in WRAPPERS if isinstance(loaded.get(key), dict)), None)
        if inner is None:
            keys = ", ".join(sorted(map(str, loaded))[:8]) or "none"
            raise UserError(
                f"{path}: no state dict found (its keys: {keys}); expected tensors, or one of "
                f"{', '.join(WRAPPERS)} holding them"
            )
        loaded = inner
    if not isinstance(loaded, dict) or not loaded:
        raise UserError(f"{path}: holds {type(loaded).__name__}, not a state dict of tensors")
    for prefix in PREFIXES:
        if all(key.startswith(prefix) for key in loaded):
            loaded = {key[len(prefix) :]: value for key, value in loaded.items()}
    return loaded


def is_state(mapping: dict) -> bool:
    return bool(mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in mapping.items())


def weights_file(folder: Path, where: str) -> Path:
    """The weights file in a downloaded folder: its one state-dict file, or its `model.safetensors` (a kdpipe
    stage's, or an MLflow Model's) among several."""
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in STATE_SUFFIXES)
    named = [p for p in found if p.name == "model.safetensors"]
    if len(found) == 1 or len(named) == 1:
        return (named or found)[0]
    files = ", ".join(str(p.relative_to(folder)) for p in sorted(folder.rglob("*")) if p.is_file())
    raise UserError(
        f"{where}: expected one weights file ({', '.join(STATE_SUFFIXES)}) or a model.safetensors, found: "
        f"{files[:300] or 'no files'}"
    )


def fit_state(
    model: nn.Module, head: set[str], state: dict[str, torch.Tensor], where: str
) -> tuple[dict[str, torch.Tensor], tuple[str, ...], str]:
    """`state` fitted to `model`: (the tensors to load, the keys that keep the model's own initialisation, a note).

    `head` holds the keys whose shapes follow the number of classes. When only those differ, the head starts fresh
    and the note says so; any other difference is one line naming a few missing, unexpected and reshaped keys."""
    own = model.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    reshaped = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if not (missing or unexpected or reshaped):
        return state, (), ""
    if set(missing + reshaped) <= head and not unexpected:
        weight = next((state[k] for k in reshaped if state[k].dim() > 1), None)
        classes = f"{weight.shape[0]} classes" if weight is not None else "no head"
        fresh = tuple(sorted(head))
        kept = {k: v for k, v in state.items() if k not in head}
        ours = next(own[k].shape[0] for k in fresh if own[k].dim() > 1)
        return kept, fresh, f"{where}: the weights have {classes}, the data {ours}: the classifier head starts fresh"
    parts = [
        f"{label} {', '.join(keys[:SHOWN])}{' ...' if len(keys) > SHOWN else ''} ({len(keys)})"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shapes", reshaped))
        if keys
    ]
    raise UserError(f"{where}: the weights do not fit the model: {'; '.join(parts)}")


def torchvision_file(name: str, cache: Path, where: str, fetch: bool = True) -> Path:
    """The file of a torchvision Weights enum (`ResNet50_Weights.IMAGENET1K_V2`) in `cache`, downloaded there
    first unless `fetch` is False (checked against the hash its name carries, as torchvision does); a file already
    there is used as it is."""
    url = torchvision_weights(name, where).url
    file = cache / Path(urlparse(url).path).name
    if fetch and not file.exists():
        cache.mkdir(parents=True, exist_ok=True)
        match = torch.hub.HASH_REGEX.search(file.name)
        try:
            torch.hub.download_url_to_file(url, str(file), match.group(1) if match else None, progress=False)
        except (OSError, RuntimeError) as err:
            raise UserError(f"{where}: cannot download {url} ({err}); or put the file at {file}") from None
    return file


def timm_config(name: str, where: str):  # -> timm.models.PretrainedCfg
    """timm's pretrained config of `name` (`vit_tiny_patch16_224`, or with its tag: `resnet50.a1_in1k`)."""
    from timm.models import get_pretrained_cfg

    try:
        config = get_pretrained_cfg(name)
    except RuntimeError:  # an unknown tag of a known model
        config = None
    if config is None or not config.hf_hub_id:
        raise UserError(f"{where}: timm has no pretrained weights '{name}' on the Hugging Face Hub")
    return config


def timm_file(name: str, cache: Path, where: str, fetch: bool = True) -> Path | None:
    """The Hugging Face Hub file of timm's pretrained `name`, downloaded once into `cache` (the Hub's own cache
    layout); None when `fetch` is False and it is not there yet."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    config = timm_config(name, where)
    files = [config.hf_hub_filename] if config.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for file in files:
        try:
            return Path(hf_hub_download(config.hf_hub_id, file, cache_dir=cache, local_files_only=not fetch))
        except EntryNotFoundError:
            continue
        except LocalEntryNotFoundError:
            if not fetch:
                return None
            raise UserError(f"{where}: cannot download {config.hf_hub_id} from the Hugging Face Hub") from None
    raise UserError(f"{where}: {config.hf_hub_id} holds none of {', '.join(files)}")


def timm_state(name: str, path: Path, args: dict) -> dict[str, torch.Tensor]:
    """A timm checkpoint as its model holds it, loaded the way timm loads it (its filter adapts, for one, a ViT's
    position embedding to another `img_size`), with the head the weights came with."""
    import timm

    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **args)
    return model.state_dict()


def timm_input(name: str, args: dict, where: str) -> ModelInput:
    """The normalization timm's pretrained `name` was trained with, at the image size the model is built for."""
    config = timm_config(name, where)
    size = args.get("img_size", config.input_size[-1])
    return ModelInput(tuple(config.mean), tuple(config.std), size if isinstance(size, int) else size[-1])


def torchvision_input(name: str, where: str) -> ModelInput:
    """The normalization and crop size of torchvision's evaluation transforms for the weights `name`."""
    transforms = torchvision_weights(name, where).transforms()
    return ModelInput(tuple(transforms.mean), tuple(transforms.std), transforms.crop_size[0])


def torchvision_weights(name: str, where: str):  # -> torchvision.models.WeightsEnum
    import torchvision

    try:
        return torchvision.models.get_weight(name)
    except (KeyError, ValueError):
        raise UserError(
            f"{where}: unknown torchvision weights '{name}'; expected an enum member such as "
            "ResNet50_Weights.IMAGENET1K_V2"
        ) from None
