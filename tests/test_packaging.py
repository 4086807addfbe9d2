"""Installing hetplan prints no setuptools deprecation about the license: pyproject.toml gives it as an SPDX
expression (PEP 639), which the setuptools named in build-system.requires accepts."""

from __future__ import annotations

import warnings

import tomllib

from tests.helpers import REPO_ROOT


def test_license_is_an_spdx_string_and_setuptools_reads_it_without_warnings():
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    pyproject = REPO_ROOT / "pyproject.toml"
    data = tomllib.loads(pyproject.read_text())
    assert data["project"]["license"] == "Apache-2.0"
    (setuptools,) = [r.replace(" ", "") for r in data["build-system"]["requires"] if r.startswith("setuptools")]
    assert int(setuptools.split(">=")[1].split(".")[0]) >= 77, setuptools  # the first with PEP 639 licenses
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), pyproject)
    about_license = [str(w.message) for w in caught if "license" in str(w.message).lower()]
    assert not about_license, about_license
    assert dist.metadata.license_expression == "Apache-2.0"
