"""Model backends behind one narrow, batched request interface (see :mod:`visa.backends.base`)."""
