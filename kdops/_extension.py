"""Loads the compiled kernels (kdops._C) and checks that they were built for the running torch."""

import torch

REBUILD = (
    "Rebuild kdops in this environment: `pip install --no-build-isolation --force-reinstall --no-deps .` "
    "from the kdops source (or `make build` in a checkout)."
)


def load():
    try:
        from kdops import _C
    except ModuleNotFoundError as e:
        raise ImportError("kdops: the compiled extension kdops._C is missing (kdops was not built). " + REBUILD) from e
    except (ImportError, OSError) as e:
        raise ImportError(
            "kdops: the compiled extension kdops._C failed to load with torch %s (%s). It was most likely built "
            "against another torch version or build, whose C++ ABI differs. %s" % (torch.__version__, e, REBUILD)
        ) from e
    if _C.torch_version != torch.__version__:
        raise ImportError(
            "kdops: the compiled extension was built against torch %s but torch %s is running. %s"
            % (_C.torch_version, torch.__version__, REBUILD)
        )
    return _C
