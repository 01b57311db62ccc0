"""The weight matmul funnel and its kernels: quantized formats and linear(), the native C kernels (*.c here) and their ctypes loader."""
