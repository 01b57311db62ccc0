"""The data plane: the star allreduce, its wire format, and the authenticated TCP lanes that carry it (ZeroMQ where a lane cannot be built)."""
