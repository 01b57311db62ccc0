"""Load generator for any OpenAI-compatible server (edgellm, llama.cpp server, vLLM, ...).

One module per job: ``workload`` (prompts, lengths, arrival times), ``client`` (one timed
streaming request), ``runner`` (closed or open loop, warm-up, bounds), ``stats`` (percentiles,
goodput), ``report`` (terminal summary, sweep plot), ``cli`` (``python -m loadtest``).
"""
