"""Accuracy and cost benchmarks of the model (issue 3); results in benchmarks/README.md.

Run ``python -m benchmarks.fidelity`` and ``python -m benchmarks.population_cost``
(``make bench``). JAX is configured here, before any module imports it: CPU, float64.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_ENABLE_X64", "1")
