"""shopml: a Kubernetes-native MLOps platform for e-commerce search and recommendation.

The package holds the library code shared by the pipeline stages in ``components/``, the
KServe model servers in ``serving/`` and the ``shopml`` command line.
"""

__version__ = "0.1.0"
