"""A two-task example experiment for ``dst``, named ``two_moons:TwoMoonsExperiment``.

Put the folder that contains this package (``examples/``) on ``PYTHONPATH``, or install it,
so that every process that trains, workers included, can import it.
"""

from two_moons.experiment import TwoMoonsExperiment, TwoMoonsModel, make_moons

__all__ = ["TwoMoonsExperiment", "TwoMoonsModel", "make_moons"]
