"""Pipeline definitions: wiring and parameters only; the work lives in ``components/``."""
