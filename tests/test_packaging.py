"""The distribution ships every package folder, the presets, the bundled text and the card templates."""

import os

import tomllib

import subquadratic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_package_folder_is_listed_in_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "subquadratic")):
        if "__init__.py" in files:
            found.add(os.path.relpath(folder, ROOT).replace(os.sep, "."))
    assert found | {"subquadratic.model_cards"} == listed


def test_package_data_is_importable():
    from importlib import resources

    from subquadratic.training.config import preset_names

    assert "reformer-enwik8-tiny" in preset_names()
    assert resources.files("subquadratic.model_cards").joinpath("default.md").is_file()
    assert resources.files("subquadratic.training").joinpath("data/tiny_shakespeare.txt").is_file()
    assert subquadratic.__version__
