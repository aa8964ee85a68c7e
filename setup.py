"""The wheel's layout: which packages it holds, found on disk rather than listed by hand.

conf/ and plugins/ live at the top of the repository but install as `nnxtrain.conf` and
`nnxtrain.plugins`, so nothing named bare `conf` or `plugins` lands in site-packages.
pyproject.toml's `[tool.setuptools.packages.find]` can only name a package after its own
folder, so the renamed ones are discovered here: a new config folder, YAML file or plugin
module is packaged without editing anything. Everything else is in pyproject.toml.
"""

from setuptools import find_namespace_packages, setup

# Package name -> folder, for the folders installed under another name.
RENAMED = {"nnxtrain.conf": "conf", "nnxtrain.plugins": "plugins"}


def packages() -> list[str]:
    """nnxtrain and its subpackages, then each renamed folder and its subfolders."""
    found = find_namespace_packages(include=["nnxtrain", "nnxtrain.*"])
    for name, folder in RENAMED.items():
        found += [name, *(f"{name}.{sub}" for sub in find_namespace_packages(folder))]
    return found


# Config groups are folders of YAML files (namespace packages, no __init__.py needed).
setup(packages=packages(), package_dir=RENAMED, package_data={"": ["*.yaml"]})
