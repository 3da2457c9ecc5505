"""Agents: the units that score images or samples. One module per agent; see :mod:`visa.agents.base`."""
