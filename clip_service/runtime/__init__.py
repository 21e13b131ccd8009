"""The running model in a worker: loading it, admitting requests, batching them, and its health."""
