"""The package layout: one module per family in every layer, the layers' packages re-exporting their families'
public names, references under the functional names, and a loss library that never imports the trainer."""

import importlib
import inspect
import subprocess
import sys

import pytest

import kdops

FAMILIES = ("kd", "feature", "relational", "distribution", "ot", "contrastive", "lm")
LAYERS = ("_ops", "functional", "nn", "reference")


def public(module):
    """Names a family module defines itself (not those it imports)."""
    return {k for k, v in vars(module).items() if not k.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v))
            and v.__module__ == module.__name__}


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_has_a_module_in_every_layer(layer, family):
    importlib.import_module("kdops.%s.%s" % (layer, family))


@pytest.mark.parametrize("layer", ("functional", "nn", "reference"))
def test_layer_package_reexports_its_families(layer):
    package = importlib.import_module("kdops." + layer)
    for family in FAMILIES:
        module = importlib.import_module("kdops.%s.%s" % (layer, family))
        missing = {n for n in public(module) if not hasattr(package, n)} - {"Sinkhorn"}
        assert not missing, "kdops.%s does not export %s from kdops.%s.%s" % (layer, sorted(missing), layer, family)
        for name in public(module):
            if hasattr(package, name):
                assert getattr(package, name) is getattr(module, name)


@pytest.mark.parametrize("family", FAMILIES)
def test_references_live_under_the_functional_names(family):
    functional = importlib.import_module("kdops.functional." + family)
    reference = importlib.import_module("kdops.reference." + family)
    assert public(reference) <= public(functional), sorted(public(reference) - public(functional))


def test_loss_library_does_not_import_the_trainer():
    code = "import sys, kdops; print(sorted(m for m in sys.modules if m.startswith('kdops.train')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_trainer_entry_points():
    from kdops.train import cli, main
    assert main is cli.main
    assert kdops.nn.margins_from_batchnorm is kdops.nn.feature.margins_from_batchnorm
