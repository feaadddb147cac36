"""The op layer: which backend runs a call (registry, dispatch), how it is called (call), its autograd and the
eager CPU fast path, and sigma (PNI's noise scale). Between the public functions and the backends."""
