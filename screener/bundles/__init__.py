"""Model bundles shipped inside the package (``demo/``: the demo bundle, NOT for clinical use)."""
