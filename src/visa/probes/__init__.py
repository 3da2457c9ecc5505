"""Probes: label-free checks built from the pool itself that tell which agent is right.

:mod:`visa.probes.ladder` makes the probe rows (degraded copies of pool images, samples moved to
other images, garbled answers), :mod:`visa.probes.value` turns the agents' scores on them into
Shapley weights with bootstrap intervals.
"""
