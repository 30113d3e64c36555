"""Drafter fixtures: tiny drafters of every kind for tiny targets, exported once per session."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def target_model(tiny_target):
    """``target_model(family) -> TargetModel`` over the exported tiny target."""
    from vispec.runtime.target import TargetModel

    opened = {}

    def get(family: str):
        if family not in opened:
            opened[family] = TargetModel(tiny_target(family)[1])
        return opened[family]

    return get


@pytest.fixture
def two_images(noise_image):
    """Two noise images: a prompt with two image runs and text between them."""
    return [noise_image(seed=1), noise_image(seed=2)]


@pytest.fixture(scope="session")
def table_drafter(tiny_target, tiny_drafter, tmp_path_factory):
    """``table_drafter(kind, family, table) -> (drafter_dir, artifact_dir)``: the tiny drafter
    whose ``embed_tokens`` is a copy of the target's ("copy", the ``tiny_drafter`` itself),
    its own perturbed table ("own"), or absent from the checkpoint ("none")."""
    import torch
    from safetensors.torch import load_file, save_file

    from vispec.exporter.drafters.export import export_drafter
    from vispec.runtime.manifest import Manifest

    built = {}

    def get(kind: str, family: str, table: str):
        if table == "copy":
            return tiny_drafter(kind, family)
        if (kind, family, table) not in built:
            source, artifacts = tiny_drafter(kind, family)
            root = tmp_path_factory.mktemp(f"{kind}-{family}-{table}")
            drafter_dir = root / "drafter"
            drafter_dir.mkdir()
            (drafter_dir / "config.json").write_bytes((source / "config.json").read_bytes())
            state = load_file(source / "model.safetensors")
            embed = state.pop("embed_tokens.weight")
            if table == "own":
                noise = torch.randn(embed.shape, generator=torch.Generator().manual_seed(0))
                state["embed_tokens.weight"] = embed + noise * embed.std()
            save_file(state, drafter_dir / "model.safetensors")
            like = Manifest.load(artifacts)  # exported alike
            export_drafter(drafter_dir, tiny_target(family)[0], root / "artifacts",
                           top_k=like.model["top_k"], max_len=like.max_len)
            built[kind, family, table] = drafter_dir, root / "artifacts"
        return built[kind, family, table]

    return get

