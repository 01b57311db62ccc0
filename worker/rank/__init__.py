"""One rank at run time: building it from its spec, its step loop, its gRPC control service, and rank 0's executor with the hub."""
