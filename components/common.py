"""What every KFP component of shopml shares: the image and the decorator settings."""

from collections.abc import Callable
from typing import Any

from kfp import dsl

from shopml.config import component_image


def stage_component(func: Callable[..., Any]) -> Any:
    """Declare ``func`` as a lightweight KFP component that runs in the shopml image.

    The image already holds shopml and kfp, so nothing is pip-installed at run time.
    Component bodies must import what they use inside the function: KFP ships only the
    function's source to the container.

    Inside a running component (``_KFP_RUNTIME=true``) KFP's runtime ``dsl`` has no
    ``component``; a stage module imported there returns its functions undecorated.
    """
    if not hasattr(dsl, "component"):
        return func
    return dsl.component(base_image=component_image(), install_kfp_package=False)(func)
