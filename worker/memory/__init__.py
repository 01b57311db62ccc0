"""What a rank holds in memory and streams under its budget: the budget maths, the sliding window of weights, the I/O thread, the expert cache, the KV cache."""
